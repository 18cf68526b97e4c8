//! Connectors and routing rules (docs/API.md, "Connectors" and "Routing"): the rows an operator
//! writes and every node's routing reads (through `adapters::connectors`' cache).

use serde_json::Value;

use super::reconciliation::{connector_from_row, Connector, CONNECTOR_COLUMNS};
use super::{pg_error, Db, StoreError};
use crate::domain::MerchantId;

/// A connector to insert; `credentials` already sealed.
pub struct NewConnector<'a> {
    pub id: &'a str,
    pub merchant: &'a MerchantId,
    pub psp: &'a str,
    pub label: &'a str,
    pub enabled: bool,
    pub currencies: &'a [String],
    pub settings: &'a Value,
    pub credentials: Option<&'a [u8]>,
}

/// Fields of a connector to change; `None` keeps the stored value.
#[derive(Default)]
pub struct ConnectorChange<'a> {
    pub label: Option<&'a str>,
    pub enabled: Option<bool>,
    pub currencies: Option<&'a [String]>,
    pub settings: Option<&'a Value>,
    pub credentials: Option<&'a [u8]>,
}

impl Db {
    /// Inserts a connector, once per id: `Ok((connector, true))` when this call made it,
    /// `Ok((stored, false))` when the id was already taken (the caller compares).
    pub async fn insert_connector(&self, c: NewConnector<'_>) -> Result<(Connector, bool), StoreError> {
        let client = self.client().await?;
        let made = client
            .query_opt(
                &format!(
                    "INSERT INTO connectors (id, merchant_id, psp, label, enabled, currencies, settings, credentials)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING RETURNING {CONNECTOR_COLUMNS}"
                ),
                &[
                    &c.id,
                    &c.merchant.as_str(),
                    &c.psp,
                    &c.label,
                    &c.enabled,
                    &c.currencies,
                    &c.settings,
                    &c.credentials,
                ],
            )
            .await
            .map_err(pg_error)?;
        if let Some(row) = made {
            return Ok((connector_from_row(&row), true));
        }
        let row = client
            .query_one(
                &format!("SELECT {CONNECTOR_COLUMNS} FROM connectors WHERE id = $1"),
                &[&c.id],
            )
            .await
            .map_err(pg_error)?;
        Ok((connector_from_row(&row), false))
    }

    /// Changes a connector of `merchant`; `None` when it has no such connector.
    pub async fn update_connector(
        &self,
        merchant: &MerchantId,
        id: &str,
        ch: ConnectorChange<'_>,
    ) -> Result<Option<Connector>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE connectors SET label = coalesce($3, label), enabled = coalesce($4, enabled),
                        currencies = coalesce($5, currencies), settings = coalesce($6, settings),
                        credentials = coalesce($7, credentials), updated_at = now()
                     WHERE id = $1 AND merchant_id = $2 RETURNING {CONNECTOR_COLUMNS}"
                ),
                &[
                    &id,
                    &merchant.as_str(),
                    &ch.label,
                    &ch.enabled,
                    &ch.currencies,
                    &ch.settings,
                    &ch.credentials,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(connector_from_row))
    }

    /// A connector's sealed credentials, if it has any.
    pub async fn connector_credentials(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT credentials FROM connectors WHERE id = $1", &[&id])
            .await
            .map_err(pg_error)?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The merchant's routing rules as stored, and their version.
    pub async fn routing_rules(&self, merchant: &MerchantId) -> Result<Option<(Value, i32)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT rules, version FROM routing_rules WHERE merchant_id = $1",
                &[&merchant.as_str()],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Replaces the merchant's routing rules (already validated); returns their version, which
    /// only a change bumps (the same rules put again are the same version).
    pub async fn put_routing_rules(&self, merchant: &MerchantId, rules: &Value) -> Result<i32, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH up AS (
                    INSERT INTO routing_rules (merchant_id, rules) VALUES ($1, $2)
                    ON CONFLICT (merchant_id) DO UPDATE SET rules = excluded.rules,
                       version = routing_rules.version + 1, updated_at = now()
                    WHERE routing_rules.rules IS DISTINCT FROM excluded.rules
                    RETURNING version)
                 SELECT version FROM up
                 UNION ALL SELECT version FROM routing_rules WHERE merchant_id = $1 AND NOT EXISTS (SELECT 1 FROM up)",
                &[&merchant.as_str(), rules],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }
}
