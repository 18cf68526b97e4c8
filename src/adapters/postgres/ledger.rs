//! Ledger reads: a merchant's balances and a payment's journals. Journals are written with
//! their transitions, in [`super::commit`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{pg_error, Db};
use crate::domain::ledger::merchant_payable;
use crate::domain::record::timestamp;
use crate::domain::{MerchantId, PaymentId};
use crate::error::ApiError;

impl Db {
    /// Per currency: what the ledger owes the merchant, and refunds still pending.
    pub async fn merchant_balances(&self, merchant: &MerchantId) -> Result<Vec<Value>, ApiError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT currency::text, sum(credit_total - debit_total)::bigint FROM ledger_accounts
                 WHERE account = $1 GROUP BY currency",
            )
            .await
            .map_err(pg_error)?;
        let mut balances: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for row in client
            .query(&stmt, &[&merchant_payable(merchant)])
            .await
            .map_err(pg_error)?
        {
            balances.entry(row.get(0)).or_default().0 = row.get(1);
        }
        let stmt = client
            .prepare_cached(
                "SELECT currency::text, sum(amount)::bigint FROM refunds WHERE merchant_id = $1 AND status = 'pending'
                 GROUP BY currency",
            )
            .await
            .map_err(pg_error)?;
        for row in client.query(&stmt, &[&merchant.as_str()]).await.map_err(pg_error)? {
            balances.entry(row.get(0)).or_default().1 = row.get(1);
        }
        Ok(balances
            .into_iter()
            .map(|(currency, (payable, pending))| json!({ "currency": currency, "payable": payable, "pending_refunds": pending }))
            .collect())
    }

    /// A payment's journals with their entries, oldest first.
    pub async fn journals_of_payment(&self, id: &PaymentId) -> Result<Vec<Value>, ApiError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT j.id, j.kind, j.currency::text, j.created_at, e.account, e.debit, e.credit
                 FROM journals j JOIN entries e ON e.journal_id = j.id
                 WHERE j.payment_id = $1 ORDER BY j.created_at, j.id, e.id",
            )
            .await
            .map_err(pg_error)?;
        let mut journals: Vec<(String, Value)> = Vec::new();
        for row in client.query(&stmt, &[&id.as_str()]).await.map_err(pg_error)? {
            let id: String = row.get(0);
            if journals.last().map(|(j, _)| j != &id).unwrap_or(true) {
                let at: DateTime<Utc> = row.get(3);
                let journal = json!({ "journal_id": id, "kind": row.get::<_, String>(1), "currency": row.get::<_, String>(2),
                                      "entries": [], "created_at": timestamp(at) });
                journals.push((id, journal));
            }
            let entry = json!({ "account": row.get::<_, String>(4), "debit": row.get::<_, i64>(5), "credit": row.get::<_, i64>(6) });
            if let Some((_, j)) = journals.last_mut() {
                if let Some(entries) = j["entries"].as_array_mut() {
                    entries.push(entry);
                }
            }
        }
        Ok(journals.into_iter().map(|(_, j)| j).collect())
    }
}
