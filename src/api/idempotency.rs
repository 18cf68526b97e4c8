//! `Idempotency-Key` on every POST under `/api/v1` (docs/API.md, "Idempotency"): a retry replays
//! the first answer byte for byte; a reuse with another request is 422; a key in flight is 409;
//! a 5xx stores nothing and frees the key.

use std::future::Future;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::{json_response, AppState};
use crate::actors::{IdemKey, Reply};
use crate::adapters::postgres::idempotency::{Begin, KeyClaim, Released};
use crate::adapters::postgres::merchants::Merchant;
use crate::api::error::ApiError;

/// The key's SHA-256 in hex, if the request carries a valid key: 1–255 printable ASCII
/// characters. Only the digest is ever stored or compared, so whatever a merchant puts in a
/// key (even card data, by mistake) never reaches storage or a log.
pub fn key(req: &HttpRequest) -> Result<String, ApiError> {
    let key = req
        .headers()
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::IdempotencyKeyMissing)?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ApiError::IdempotencyKeyMissing);
    }
    Ok(hex::encode(Sha256::digest(key.as_bytes())))
}

/// What every idempotent mutation starts from: the authenticated merchant, the body (within
/// `[server] body_limit_bytes`), and the digest of its `Idempotency-Key`.
pub async fn begin(
    state: &AppState,
    req: &HttpRequest,
    payload: actix_web::web::Payload,
) -> Result<(std::sync::Arc<Merchant>, actix_web::web::Bytes, String), ApiError> {
    let merchant = super::auth::merchant(state, req).await?;
    let body = super::body::read(req, payload, state.config.server.body_limit_bytes).await?;
    Ok((merchant, body, key(req)?))
}

/// The id of a resource a request creates, made from its idempotency key: `{prefix}_` and 24
/// hex digits, the same for every retry of the request, so a retry finds what the first made.
pub fn derived_id(prefix: &str, merchant: &str, key: &str) -> String {
    format!(
        "{prefix}_{}",
        &hex::encode(Sha256::digest(format!("{merchant}:{key}").as_bytes()))[..24]
    )
}

/// An operation's answer: `value` as JSON with `status`, for [`run`] to store as the key's record.
pub fn reply_json(status: u16, value: &serde_json::Value) -> Result<Reply, ApiError> {
    Ok(Reply {
        status,
        body: serde_json::to_vec(value).map_err(|_| ApiError::Internal)?,
        stored: false,
    })
}

/// What identifies "the same request": method, path and the exact body bytes.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// The key a running operation completes, and what an interrupted first attempt created.
pub struct Ticket {
    pub key: IdemKey,
    pub resource_id: Option<String>,
}

/// Runs `op` on the `parsed` request at most once per (merchant, key) and answers as docs/API.md
/// says. A request that failed validation stores nothing, but a key already used for another
/// request is still a 422.
pub async fn run<T, F, Fut>(
    state: &AppState,
    merchant: &Merchant,
    req: &HttpRequest,
    key: String,
    body: &[u8],
    parsed: Result<T, ApiError>,
    op: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce(T, Ticket) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    let fp = fingerprint(req.method().as_str(), req.path(), body);
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            return match state.db.idempotency_fingerprint(&merchant.id, &key).await? {
                Some(stored) if stored != fp => {
                    state.metrics.idempotency_conflict("reused");
                    Err(ApiError::IdempotencyKeyReused)
                }
                _ => Err(e),
            }
        }
    };
    let lease = state.config.idempotency.in_flight_lease_ms;
    // Cluster mode: the claim names this process, and a key whose process is no longer a live
    // node's is taken over at once.
    let live = || state.leases.as_ref().and_then(|l| l.holders());
    let claimant = state
        .leases
        .as_ref()
        .map(|l| crate::adapters::postgres::idempotency::Claimant {
            holder: &l.holder,
            live: &live,
        });
    let asked = std::time::Instant::now();
    let begun = state
        .db
        .idempotency_begin_as(&merchant.id, &key, &fp, lease, claimant.as_ref())
        .await;
    // Failures too: a claim that waited out its bound is the tail worth seeing.
    state.metrics.idempotency_claim(asked.elapsed());
    let begun = begun?;
    let verdict = match &begun {
        Begin::Proceed { fence: 1, .. } => "new",
        Begin::Proceed { .. } => "taken over",
        Begin::Replay { .. } => "replay",
        Begin::InFlight => "in flight",
        Begin::Mismatch => "reused",
    };
    tracing::debug!(verdict, "idempotency key");
    match begun {
        Begin::Replay { status, body } => {
            state.metrics.replayed();
            let mut resp = json_response(status, body);
            resp.headers_mut().insert(
                HeaderName::from_static("idempotent-replayed"),
                HeaderValue::from_static("true"),
            );
            Ok(resp)
        }
        Begin::InFlight => {
            state.metrics.idempotency_conflict("in_use");
            Err(ApiError::IdempotencyKeyInUse)
        }
        Begin::Mismatch => {
            state.metrics.idempotency_conflict("reused");
            Err(ApiError::IdempotencyKeyReused)
        }
        Begin::Proceed { resource_id, fence } => {
            let ticket = Ticket {
                key: IdemKey {
                    merchant: merchant.id.clone(),
                    key: key.clone(),
                    fence,
                    claim: None,
                },
                resource_id,
            };
            let result = op(parsed, ticket).await;
            let mut first_answer = None;
            let done = match completion(&result) {
                Completion::Stored => Ok(()),
                Completion::Store(status, body) => state
                    .db
                    .idempotency_store(&merchant.id, &key, fence, status, &body)
                    .await
                    .map(|stored| first_answer = stored),
                Completion::Release => state.db.idempotency_release(&merchant.id, &key, fence).await,
                Completion::Keep => Ok(()),
            };
            if let Err(e) = done {
                // The operation's answer stands; the record stays in flight until the lease ends,
                // and a retry then resumes from what the operation left.
                tracing::warn!(error = %e, "could not complete an idempotency record");
            }
            if let Some((status, body)) = first_answer {
                // This request's own commit stored its answer before the re-run's: every retry
                // replays that one, so this answer is it too.
                return Ok(json_response(status, body));
            }
            result.map(|reply| json_response(reply.status, reply.body))
        }
    }
}

/// Keys this node saw a create use lately: a retry, or a duplicate sent while the first still
/// runs, claims its key the ordinary way at once instead of running up to a commit that would
/// find the key held (and making its batch be written again commit by commit). Only a saving:
/// a key missing here (used on another node, or forgotten) still meets the held key at that
/// commit. Bounded: two generations of at most [`RECENT_KEYS`] each; when the newer fills, the
/// older is dropped.
#[derive(Default)]
pub struct RecentKeys {
    generations: std::sync::Mutex<[std::collections::HashSet<u64>; 2]>,
}

/// Keys a generation of [`RecentKeys`] holds: two of them, about 2 MiB, cover the minutes in
/// which clients retry at this node's peak rate.
pub const RECENT_KEYS: usize = 65_536;

impl RecentKeys {
    /// Notes `key` (a digest, as [`key`] makes it) of `merchant`; `true` if it was noted already.
    pub fn seen(&self, merchant: &str, key: &str) -> bool {
        let digest = key
            .get(..16)
            .and_then(|k| u64::from_str_radix(k, 16).ok())
            .unwrap_or_default();
        let id = digest ^ crate::domain::ids::stable_hash(merchant);
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        if g[0].contains(&id) || g[1].contains(&id) {
            return true;
        }
        if g[0].len() >= RECENT_KEYS {
            g[1] = std::mem::take(&mut g[0]);
        }
        g[0].insert(id);
        false
    }
}

/// [`run`] for a create whose new payment's first commit claims the key itself, so that a
/// request costs no claim of its own before it (docs/DESIGN.md, "A key claimed by the payment's
/// first commit"). Sound because nothing the operation does before that commit reaches the
/// world (no PSP call, no stored row) and the payment's id is new: a request that holds the key
/// already (the first of a retried request, a duplicate sent at the same time) is found by that
/// commit, which then writes nothing. `Ok(None)` says so: the caller then claims the key with
/// [`run`], which answers as for any key in use (a replay, 409, 422).
///
/// The key is completed as [`run`] completes it, on the row only if it is this request's: the
/// one its commit inserted (naming `resource`), or a new one if the request ended before it.
/// A request that ended before its commit and finds the key held (its answer computed again by a
/// retry, say) is answered as the key says too, so a retry replays the first answer; and one
/// whose commit stored an answer though it was reported failed answers that stored answer, not
/// its re-run's.
pub async fn run_first<F, Fut>(
    state: &AppState,
    merchant: &Merchant,
    req: &HttpRequest,
    key: &str,
    body: &[u8],
    resource: &str,
    op: F,
) -> Result<Option<HttpResponse>, ApiError>
where
    F: FnOnce(Ticket) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    let claim = KeyClaim {
        fingerprint: fingerprint(req.method().as_str(), req.path(), body).to_vec(),
        lease_ms: state.config.idempotency.in_flight_lease_ms,
        holder: state.leases.as_ref().map(|l| l.holder.to_string()),
    };
    let ticket = Ticket {
        key: IdemKey {
            merchant: merchant.id.clone(),
            key: key.to_owned(),
            fence: 1,
            claim: Some(claim.clone()),
        },
        resource_id: None,
    };
    tracing::debug!(verdict = "first commit", "idempotency key");
    let result = op(ticket).await;
    if matches!(result, Err(ApiError::IdempotencyKeyHeld)) {
        tracing::debug!("idempotency key held; claiming it");
        return Ok(None);
    }
    let ours = match completion(&result) {
        Completion::Stored | Completion::Keep => Ok(true),
        Completion::Store(status, body) => match state
            .db
            .idempotency_store_first(&merchant.id, key, &claim, resource, status, &body)
            .await
        {
            // The key's answer now: this request's (or the one its own landed commit stored).
            Ok(Some((status, body))) => return Ok(Some(json_response(status, body))),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        },
        // A 5xx with no row at all stays the answer (nothing ran); another request's row answers.
        Completion::Release => state
            .db
            .idempotency_release_first(&merchant.id, key, resource)
            .await
            .map(|r| r != Released::Held),
    };
    match ours {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!("idempotency key held; claiming it");
            return Ok(None);
        }
        Err(e) => tracing::warn!(error = %e, "could not complete an idempotency record"),
    }
    result.map(|reply| Some(json_response(reply.status, reply.body)))
}

/// What an operation's result leaves on its idempotency key.
#[derive(Debug, PartialEq)]
pub enum Completion {
    /// The operation's own commit stored the answer.
    Stored,
    /// Store this answer now: a retry replays it.
    Store(u16, Vec<u8>),
    /// A 5xx or a conflict: store nothing and free the key, so a retry runs again.
    Release,
    /// The outcome is unknown (the payment's node did not answer a forwarded call in time and
    /// may still be at work): leave the key in flight until its lease passes, so that a retry
    /// meanwhile is refused rather than run beside the first.
    Keep,
}

/// The one rule for completing a key, shared by the API and the simulation.
pub fn completion(result: &Result<Reply, ApiError>) -> Completion {
    match result {
        Ok(reply) if reply.stored => Completion::Stored,
        Ok(reply) => Completion::Store(reply.status, reply.body.clone()),
        Err(e) if e.is_replayable() => Completion::Store(e.status().as_u16(), e.body()),
        Err(ApiError::OutcomeUnknown) => Completion::Keep,
        Err(_) => Completion::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::{fingerprint, RecentKeys, RECENT_KEYS};

    #[test]
    fn recent_keys_are_seen_once_per_merchant_and_stay_bounded() {
        // As `key` makes them: hex digests, whose first 64 bits differ.
        let k = |i: usize| {
            format!(
                "{:016x}{}",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                "0".repeat(48)
            )
        };
        let recent = RecentKeys::default();
        assert!(!recent.seen("mer_a", &k(1)));
        assert!(recent.seen("mer_a", &k(1)));
        assert!(!recent.seen("mer_b", &k(1)), "keys are per merchant");
        for i in 2..(2 * RECENT_KEYS + 10) {
            recent.seen("mer_a", &k(i));
        }
        let g = recent.generations.lock().unwrap();
        assert!(g[0].len() <= RECENT_KEYS && g[1].len() <= RECENT_KEYS);
        drop(g);
        assert!(!recent.seen("mer_a", &k(1)), "the oldest are forgotten");
        assert!(recent.seen("mer_a", &k(2 * RECENT_KEYS + 9)), "the newest are kept");
    }

    #[test]
    fn fingerprints_separate_method_path_and_body() {
        let a = fingerprint("POST", "/api/v1/payments", b"{}");
        assert_eq!(a, fingerprint("POST", "/api/v1/payments", b"{}"));
        assert_ne!(a, fingerprint("POST", "/api/v1/payments", b"{ }"));
        assert_ne!(a, fingerprint("PUT", "/api/v1/payments", b"{}"));
        assert_ne!(fingerprint("POST", "/a", b"b"), fingerprint("POST", "/ab", b""));
    }
}
