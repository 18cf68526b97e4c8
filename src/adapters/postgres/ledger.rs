//! Ledger reads: a merchant's balances and a payment's journals. Journals are written with
//! their transitions, in [`super::commit`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{pg_error, Db, StoreError};
use crate::domain::ledger::merchant_payable;
use crate::domain::record::timestamp;
use crate::domain::{MerchantId, PaymentId};

impl Db {
    /// Per currency: what the ledger owes the merchant, and refunds still pending.
    pub async fn merchant_balances(&self, merchant: &MerchantId) -> Result<Vec<Value>, StoreError> {
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
    pub async fn journals_of_payment(&self, id: &PaymentId) -> Result<Vec<Value>, StoreError> {
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

/// What `payrail ledger verify` found.
#[derive(Debug, Default)]
pub struct LedgerReport {
    /// Σ debit − Σ credit per currency over every entry: 0 in a sound ledger.
    pub imbalance_by_currency: Vec<(String, i128)>,
    /// (account, currency, stored debit, stored credit, Σ entry debits, Σ entry credits) where
    /// the stored balance (summed over slots) differs from the entries.
    pub mismatched_accounts: Vec<(String, String, i128, i128, i128, i128)>,
    /// Journals whose entries do not balance.
    pub unbalanced_journals: Vec<String>,
    /// Journal ids that entries name and no journal has (the database refuses such an entry
    /// as it is written; this finds one that came in around the triggers, by a restore say).
    pub orphan_entries: Vec<String>,
    pub journals: i64,
    pub entries: i64,
}

impl LedgerReport {
    pub fn is_clean(&self) -> bool {
        self.imbalance_by_currency.iter().all(|(_, d)| *d == 0)
            && self.mismatched_accounts.is_empty()
            && self.unbalanced_journals.is_empty()
            && self.orphan_entries.is_empty()
    }
}

fn big(row: &tokio_postgres::Row, i: usize) -> i128 {
    row.get::<_, Option<String>>(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Db {
    /// Checks invariants 2 and 3 over the whole ledger (a full scan: an operator's tool).
    pub async fn verify_ledger(&self) -> Result<LedgerReport, StoreError> {
        let client = self.client().await?;
        let mut report = LedgerReport::default();
        for row in client
            .query(
                "SELECT currency::text, (sum(debit) - sum(credit))::text FROM entries GROUP BY currency ORDER BY 1",
                &[],
            )
            .await
            .map_err(pg_error)?
        {
            report.imbalance_by_currency.push((row.get(0), big(&row, 1)));
        }
        let rows = client
            .query(
                "WITH e AS (SELECT account, currency, sum(debit) AS d, sum(credit) AS c FROM entries GROUP BY 1, 2),
                      b AS (SELECT account, currency, sum(debit_total) AS d, sum(credit_total) AS c
                            FROM ledger_accounts GROUP BY 1, 2)
                 SELECT coalesce(e.account, b.account), coalesce(e.currency, b.currency)::text,
                        coalesce(b.d, 0)::text, coalesce(b.c, 0)::text, coalesce(e.d, 0)::text, coalesce(e.c, 0)::text
                 FROM e FULL JOIN b ON b.account = e.account AND b.currency = e.currency
                 WHERE coalesce(e.d, 0) <> coalesce(b.d, 0) OR coalesce(e.c, 0) <> coalesce(b.c, 0)
                 ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(pg_error)?;
        for row in rows {
            report.mismatched_accounts.push((
                row.get(0),
                row.get(1),
                big(&row, 2),
                big(&row, 3),
                big(&row, 4),
                big(&row, 5),
            ));
        }
        for row in client
            .query(
                // An entry in another currency than its journal's makes it unbalanced too: two
                // journals that each convert one currency into another net to zero per currency.
                "SELECT j.id FROM journals j LEFT JOIN entries e ON e.journal_id = j.id
                 GROUP BY j.id
                 HAVING count(e.id) < 2 OR coalesce(sum(e.debit), 0) <> coalesce(sum(e.credit), 0)
                     OR coalesce(bool_or(e.currency <> j.currency), false)
                 ORDER BY 1 LIMIT 1000",
                &[],
            )
            .await
            .map_err(pg_error)?
        {
            report.unbalanced_journals.push(row.get(0));
        }
        for row in client
            .query(
                "SELECT DISTINCT e.journal_id FROM entries e
                 WHERE NOT EXISTS (SELECT 1 FROM journals j WHERE j.id = e.journal_id)
                 ORDER BY 1 LIMIT 1000",
                &[],
            )
            .await
            .map_err(pg_error)?
        {
            report.orphan_entries.push(row.get(0));
        }
        let counts = client
            .query_one(
                "SELECT (SELECT count(*) FROM journals), (SELECT count(*) FROM entries)",
                &[],
            )
            .await
            .map_err(pg_error)?;
        report.journals = counts.get(0);
        report.entries = counts.get(1);
        Ok(report)
    }
}
