//! Risk rules and lists (`risk_rules`, `risk_list_items`), and the last day's attempts that
//! velocity counters are rebuilt from.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{pg_error, Db, StoreError};
use crate::domain::risk::{CardSignals, Customer};
use crate::domain::MerchantId;

/// A stored rule.
#[derive(Debug, Clone)]
pub struct RiskRow {
    pub id: String,
    pub action: String,
    pub predicate: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The most rules one merchant may have.
pub const MAX_RULES: i64 = 200;
/// The most items one list of a merchant holds.
pub const MAX_LIST_ITEMS: i64 = 100_000;

fn rule_from_row(r: &tokio_postgres::Row) -> RiskRow {
    RiskRow {
        id: r.get(0),
        action: r.get(1),
        predicate: r.get(2),
        description: r.get(3),
        created_at: r.get(4),
    }
}

/// One attempt of the last day, as velocity counts it.
pub type HistoryRow = (Option<Customer>, Option<CardSignals>, i64, DateTime<Utc>);

impl Db {
    /// The merchant's rules, oldest first (at most [`MAX_RULES`]).
    pub async fn risk_rules(&self, merchant: &MerchantId) -> Result<Vec<RiskRow>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, action, predicate, description, created_at FROM risk_rules
                 WHERE merchant_id = $1 ORDER BY created_at, id LIMIT $2",
            )
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&merchant.as_str(), &MAX_RULES])
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(rule_from_row).collect())
    }

    /// Stores a rule under `id` (derived from the request's idempotency key, so a retry finds
    /// it); `None` when the merchant already has [`MAX_RULES`].
    pub async fn insert_risk_rule(
        &self,
        merchant: &MerchantId,
        id: &str,
        action: &str,
        predicate: &str,
        description: Option<&str>,
    ) -> Result<Option<RiskRow>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // One creation per merchant at a time: the count below must see the others' rules (a
        // rule past the bound would be neither listed nor evaluated).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('risk_rules:' || $1))",
            &[&merchant.as_str()],
        )
        .await
        .map_err(pg_error)?;
        let row = tx
            .query_opt(
                "WITH existing AS (SELECT count(*) AS n FROM risk_rules WHERE merchant_id = $1),
                      ins AS (INSERT INTO risk_rules (id, merchant_id, action, predicate, description)
                              SELECT $2, $1, $3, $4, $5 FROM existing WHERE existing.n < $6
                              ON CONFLICT (id) DO NOTHING
                              RETURNING id, action, predicate, description, created_at)
                 SELECT * FROM ins
                 UNION ALL
                 SELECT id, action, predicate, description, created_at FROM risk_rules WHERE id = $2 AND merchant_id = $1",
                &[&merchant.as_str(), &id, &action, &predicate, &description, &MAX_RULES],
            )
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(row.as_ref().map(rule_from_row))
    }

    /// Deletes a rule; false if the merchant has none with this id.
    pub async fn delete_risk_rule(&self, merchant: &MerchantId, id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM risk_rules WHERE merchant_id = $1 AND id = $2",
                &[&merchant.as_str(), &id],
            )
            .await
            .map_err(pg_error)?;
        Ok(n > 0)
    }

    /// A list's items, at most `limit`, in their stored (lower-case) form.
    pub async fn risk_list_items(
        &self,
        merchant: &MerchantId,
        list: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT item FROM risk_list_items WHERE merchant_id = $1 AND list = $2 ORDER BY item LIMIT $3",
            )
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(&stmt, &[&merchant.as_str(), &list, &limit])
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Adds an item to a list (once: adding it again changes nothing); false when the list
    /// holds [`MAX_LIST_ITEMS`] already. The count is checked under a lock on the list, so
    /// concurrent additions never take it past the bound: the risk engine reads that many, and an
    /// item past them would never match.
    pub async fn add_risk_list_item(&self, merchant: &MerchantId, list: &str, item: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('risk_list:' || $1 || ':' || $2))",
            &[&merchant.as_str(), &list],
        )
        .await
        .map_err(pg_error)?;
        let row = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM risk_list_items WHERE merchant_id = $1 AND list = $2 AND item = $3),
                        (SELECT count(*) FROM risk_list_items WHERE merchant_id = $1 AND list = $2)",
                &[&merchant.as_str(), &list, &item],
            )
            .await
            .map_err(pg_error)?;
        let (there, items): (bool, i64) = (row.get(0), row.get(1));
        if there {
            return Ok(true);
        }
        if items >= MAX_LIST_ITEMS {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO risk_list_items (merchant_id, list, item) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&merchant.as_str(), &list, &item],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }

    pub async fn delete_risk_list_item(
        &self,
        merchant: &MerchantId,
        list: &str,
        item: &str,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM risk_list_items WHERE merchant_id = $1 AND list = $2 AND item = $3",
                &[&merchant.as_str(), &list, &item],
            )
            .await
            .map_err(pg_error)?;
        Ok(n > 0)
    }

    /// The attempts of the last `window_ms` that carried risk signals, the newest `limit` of
    /// them, oldest first: what velocity counters start from (the last hour counts most). Each
    /// is counted at its payment's creation, in that order: not at its last change (a capture or
    /// a settlement hours later would count it as an attempt of the last hour, and put the
    /// counters' queues out of time order).
    pub async fn risk_history(&self, window_ms: i64, limit: i64) -> Result<Vec<HistoryRow>, StoreError> {
        let client = self.client().await?;
        let secs = window_ms as f64 / 1000.0;
        let rows = client
            .query(
                "SELECT customer, card, amount, created_at FROM (
                     SELECT customer, card, amount, created_at FROM payments
                     WHERE created_at > now() - make_interval(secs => $1) AND (customer IS NOT NULL OR card IS NOT NULL)
                     ORDER BY created_at DESC LIMIT $2) newest
                 ORDER BY created_at",
                &[&secs, &limit],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                let customer: Option<Value> = r.get(0);
                let card: Option<Value> = r.get(1);
                (
                    customer.and_then(|v| serde_json::from_value(v).ok()),
                    card.and_then(|v| serde_json::from_value(v).ok()),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect())
    }
}
