//! Who is calling: a merchant by its API key, or the operator by the admin token.

use std::sync::Arc;

use actix_web::HttpRequest;
use sha2::{Digest, Sha256};

use super::{AppState, MAX_CACHED_KEYS};
use crate::adapters::postgres::merchants::{hash_key, Merchant};
use crate::api::error::ApiError;

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("Authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The merchant whose `sk_test_…`/`sk_live_…` key the request carries; 401 otherwise, and 429
/// when `[ratelimit]` is on and the merchant is over its rate.
pub async fn merchant(state: &AppState, req: &HttpRequest) -> Result<Arc<Merchant>, ApiError> {
    let m = authenticate(state, req).await?;
    if !state.rate_limiter.allow(&m.id) {
        return Err(ApiError::RateLimited);
    }
    Ok(m)
}

async fn authenticate(state: &AppState, req: &HttpRequest) -> Result<Arc<Merchant>, ApiError> {
    let key = bearer(req).ok_or(ApiError::Authentication)?;
    if !(key.starts_with("sk_test_") || key.starts_with("sk_live_")) || key.len() > 128 {
        return Err(ApiError::Authentication);
    }
    // The lookup is by hash, so neither the map nor the index compares the secret itself.
    let hash = hash_key(key);
    if let Some(m) = state.merchants.get(&hash) {
        return Ok(m.clone());
    }
    // A client whose keys failed too often this minute looks up no more of them.
    let client = req.peer_addr().map(|a| a.ip());
    let refused = || {
        let secs = client.and_then(|c| state.rate_limiter.failed_keys.refused(c, now_secs()));
        if secs.is_some() {
            state.metrics.key_lookup_refused();
        }
        secs.map(ApiError::KeysFailing)
    };
    if let Some(e) = refused() {
        return Err(e);
    }
    // Waits as long as a pooled connection may be waited for; then the database is, for this
    // request, unavailable (503), as when the pool is exhausted.
    let wait = std::time::Duration::from_millis(state.config.database.pool_wait_ms);
    let _lookup = tokio::time::timeout(wait, state.key_lookups.acquire())
        .await
        .map_err(|_| ApiError::Unavailable("database"))?
        .map_err(|_| ApiError::Internal)?;
    if let Some(m) = state.merchants.get(&hash) {
        // Looked up by another request while this one waited.
        return Ok(m.clone());
    }
    // Asked again: many requests of one client may have passed the first check together, and
    // the misses of those that went ahead of this one are counted now.
    if let Some(e) = refused() {
        return Err(e);
    }
    let Some(m) = state.db.merchant_by_key_hash(&hash).await? else {
        if let Some(client) = client {
            if state.rate_limiter.failed_keys.failed(client, now_secs()) {
                tracing::warn!(%client, "keys that are not valid, too many this minute: this client's look-ups are refused until it ends");
            }
        }
        return Err(ApiError::Authentication);
    };
    let m = Arc::new(m);
    if state.merchants.len() < MAX_CACHED_KEYS {
        state.merchants.insert(hash, m.clone());
    }
    Ok(m)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Passes when the request carries the operator token; 401 otherwise.
pub fn operator(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let given = bearer(req).ok_or(ApiError::Authentication)?;
    if constant_time_eq(given.as_bytes(), state.config.admin.token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Authentication)
    }
}

/// Compares two secrets in time that depends on neither: both are hashed first (so lengths
/// leak nothing), then every byte of the digests is compared.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"admin_token", b"admin_token"));
        assert!(!constant_time_eq(b"admin_token", b"admin_tokeN"));
        assert!(!constant_time_eq(b"admin_token", b"admin_token "));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
