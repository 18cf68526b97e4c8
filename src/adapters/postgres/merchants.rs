//! Merchants and their API keys. Keys are stored only as SHA-256 hashes.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{pg_error, Db, StoreError};
use crate::domain::record::timestamp;
use crate::domain::{Currency, MerchantId};

/// The demo merchant's key (docs/API.md, "Configuration"); only ever ensured with the sandbox PSP.
pub const DEMO_API_KEY: &str = "sk_test_demo";

#[derive(Debug, Clone)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    pub default_currency: Currency,
    pub fee_bps: u32,
    pub fee_fixed: i64,
    pub webhook_url: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Merchant {
    pub fn to_object(&self) -> Value {
        json!({
            "object": "merchant",
            "merchant_id": self.id,
            "name": self.name,
            "default_currency": self.default_currency,
            "fee_bps": self.fee_bps,
            "fee_fixed": self.fee_fixed,
            "webhook_url": self.webhook_url,
            "created_at": timestamp(self.created_at),
        })
    }
}

pub struct NewMerchant {
    pub name: String,
    pub default_currency: Currency,
    pub fee_bps: u32,
    pub fee_fixed: i64,
    pub webhook_url: Option<String>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh secret key: `sk_test_` and 32 base62 characters (about 190 random bits).
pub fn generate_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sk_test_{body}")
}

fn hint(key: &str) -> String {
    let prefix = if key.starts_with("sk_live_") {
        "sk_live_"
    } else {
        "sk_test_"
    };
    format!("{prefix}…{}", &key[key.len().saturating_sub(4)..])
}

const COLUMNS: &str = "m.id, m.name, m.default_currency, m.fee_bps, m.fee_fixed, m.webhook_url, m.created_at";

fn from_row(row: &tokio_postgres::Row) -> Result<Merchant, StoreError> {
    let currency: String = row.get(2);
    Ok(Merchant {
        id: MerchantId::from_trusted(row.get(0)),
        name: row.get(1),
        default_currency: Currency::parse(&currency).ok_or(StoreError::Broken)?,
        fee_bps: u32::try_from(row.get::<_, i32>(3)).map_err(|_| StoreError::Broken)?,
        fee_fixed: row.get(4),
        webhook_url: row.get(5),
        created_at: row.get(6),
    })
}

impl Db {
    /// Creates a merchant and its first key in one transaction; returns the plaintext key,
    /// which is never stored.
    pub async fn create_merchant(
        &self,
        new: &NewMerchant,
        key: Option<&str>,
    ) -> Result<(Merchant, String), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let id = MerchantId::generate();
        let fee_bps = i32::try_from(new.fee_bps).map_err(|_| StoreError::Broken)?;
        let row = tx
            .query_one(
                "INSERT INTO merchants (id, name, default_currency, fee_bps, fee_fixed, webhook_url)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
                &[
                    &id.as_str(),
                    &new.name,
                    &new.default_currency.code(),
                    &fee_bps,
                    &new.fee_fixed,
                    &new.webhook_url,
                ],
            )
            .await
            .map_err(pg_error)?;
        let key = key.map(str::to_owned).unwrap_or_else(generate_key);
        tx.execute(
            "INSERT INTO api_keys (key_hash, merchant_id, hint) VALUES ($1, $2, $3)",
            &[&hash_key(&key).as_slice(), &id.as_str(), &hint(&key)],
        )
        .await
        .map_err(pg_error)?;
        // Every merchant starts with its sandbox connector (docs/API.md, "Connectors").
        tx.execute(
            "INSERT INTO connectors (id, merchant_id, psp, label) VALUES ($1, $2, 'sandbox', 'sandbox')",
            &[&crate::domain::ids::sandbox_connector_id(&id), &id.as_str()],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        let merchant = Merchant {
            id,
            name: new.name.clone(),
            default_currency: new.default_currency,
            fee_bps: new.fee_bps,
            fee_fixed: new.fee_fixed,
            webhook_url: new.webhook_url.clone(),
            created_at: row.get(0),
        };
        Ok((merchant, key))
    }

    pub async fn merchant_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<Merchant>, StoreError> {
        let client = self.client().await?;
        let sql =
            format!("SELECT {COLUMNS} FROM api_keys k JOIN merchants m ON m.id = k.merchant_id WHERE k.key_hash = $1");
        let stmt = client.prepare_cached(&sql).await.map_err(pg_error)?;
        let row = client.query_opt(&stmt, &[&hash.as_slice()]).await.map_err(pg_error)?;
        row.as_ref().map(from_row).transpose()
    }

    /// Makes sure the demo merchant and its `sk_test_demo` key exist.
    pub async fn ensure_demo_merchant(
        &self,
        default_fee_bps: u32,
        default_fee_fixed: i64,
    ) -> Result<Merchant, StoreError> {
        if let Some(m) = self.merchant_by_key_hash(&hash_key(DEMO_API_KEY)).await? {
            return Ok(m);
        }
        let new = NewMerchant {
            name: "Demo Marketplace".into(),
            default_currency: Currency::parse("USD").ok_or(StoreError::Broken)?,
            fee_bps: default_fee_bps,
            fee_fixed: default_fee_fixed,
            webhook_url: None,
        };
        match self.create_merchant(&new, Some(DEMO_API_KEY)).await {
            Ok((m, _)) => Ok(m),
            // Another process ensured it first.
            Err(_) => self
                .merchant_by_key_hash(&hash_key(DEMO_API_KEY))
                .await?
                .ok_or(StoreError::Broken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_hint_hides_them() {
        let a = generate_key();
        assert_ne!(a, generate_key());
        assert!(a.starts_with("sk_test_") && a.len() == 40);
        let h = hint(&a);
        assert!(h.ends_with(&a[36..]) && !h.contains(&a[8..36]));
    }
}
