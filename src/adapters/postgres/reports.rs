//! Merchant reporting: balance transactions (the merchant's ledger movements) and the pages
//! the CSV exports stream, read by keyset so that a million rows never sit in memory; and
//! receipt tokens.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::payments::{payment_from_row, COLUMNS};
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::{merchant_payable, PLATFORM_FEE_REVENUE};
use crate::domain::record::timestamp;
use crate::domain::{MerchantId, Payment};

/// One movement of a merchant's balance: a journal that touched its payable account.
#[derive(Debug, Clone)]
pub struct BalanceTransaction {
    pub id: String,
    pub kind: &'static str,
    pub source: String,
    pub amount: i64,
    pub fee: i64,
    pub net: i64,
    pub currency: String,
    pub created: DateTime<Utc>,
}

impl BalanceTransaction {
    pub fn to_object(&self) -> Value {
        json!({ "object": "balance_transaction", "id": self.id, "type": self.kind, "source": self.source,
                "amount": self.amount, "fee": self.fee, "net": self.net, "currency": self.currency,
                "created": self.created.timestamp(), "created_at": timestamp(self.created) })
    }
}

/// Stripe's balance transaction type of a journal; `payout_status` is the payout's, for a
/// returned one (failed or canceled).
fn kind_of(journal_kind: &str, payout_status: Option<&str>) -> &'static str {
    match journal_kind {
        "capture" => "charge",
        "refund" => "refund",
        "dispute_opened" => "dispute",
        "dispute_won" => "dispute_reversal",
        "transfer" => "transfer",
        "transfer_reversal" => "transfer_refund",
        "payout" => "payout",
        "payout_returned" if payout_status == Some("canceled") => "payout_cancel",
        "payout_returned" => "payout_failure",
        _ => "adjustment",
    }
}

/// The time range of a list or an export: `from` included, `to` excluded.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// Columns of the payments export, in order.
pub const PAYMENTS_CSV_HEADER: [&str; 12] = [
    "payment_id",
    "created_at",
    "status",
    "amount",
    "currency",
    "amount_captured",
    "amount_refunded",
    "amount_disputed",
    "capture_strategy",
    "order_id",
    "psp",
    "psp_reference",
];

pub const BALANCE_CSV_HEADER: [&str; 8] = ["id", "created_at", "type", "source", "amount", "fee", "net", "currency"];

impl Db {
    /// Newest first with `before` (a journal id) as the cursor, or oldest first after
    /// `(time, id)` for exports.
    pub async fn balance_transactions(
        &self,
        merchant: &MerchantId,
        window: &Window,
        cursor: Cursor<'_>,
        limit: i64,
    ) -> Result<Vec<BalanceTransaction>, StoreError> {
        let client = self.client().await?;
        let payable = merchant_payable(merchant);
        let (order, bound) = match cursor {
            Cursor::Newest(_) => (
                "DESC",
                "$7::timestamptz IS NULL AND ($6::text IS NULL \
                 OR (j.created_at, j.id) < (SELECT created_at, id FROM journals WHERE id = $6 AND merchant_id = $1))",
            ),
            Cursor::Oldest(_) => ("ASC", "($6::text IS NULL OR (j.created_at, j.id) > ($7, $6))"),
        };
        let (after_id, after_at) = match cursor {
            Cursor::Newest(id) => (id.map(str::to_owned), None),
            Cursor::Oldest(Some((at, id))) => (Some(id.to_owned()), Some(at)),
            Cursor::Oldest(None) => (None, None),
        };
        let sql = format!(
            // The page of journals first (the index on (merchant_id, created_at, id) stops at
            // the limit), then each one's entries: a page costs its own rows, not the history.
            // A payment's journals, and the platform's transfers and payouts of its own balance
            // (journals of no payment that moved its payable; a seller's payout does not).
            "SELECT j.id, j.kind, coalesce(j.payment_id, j.correlation_id), j.currency::text, j.created_at, m.net, m.fee,
                    po.status
             FROM (SELECT id, kind, payment_id, correlation_id, currency, created_at FROM journals j
                   WHERE j.merchant_id = $1
                     AND (j.payment_id IS NOT NULL
                          OR (j.kind IN ('transfer', 'transfer_reversal', 'payout', 'payout_returned')
                              AND EXISTS (SELECT 1 FROM entries e WHERE e.journal_id = j.id AND e.account = $2)))
                     AND ($4::timestamptz IS NULL OR j.created_at >= $4) AND ($5::timestamptz IS NULL OR j.created_at < $5)
                     AND {bound}
                   ORDER BY j.created_at {order}, j.id {order} LIMIT $8) j
             CROSS JOIN LATERAL (
                 SELECT coalesce(sum(e.credit - e.debit) FILTER (WHERE e.account = $2), 0)::int8 AS net,
                        coalesce(sum(e.credit - e.debit) FILTER (WHERE e.account = $3), 0)::int8 AS fee
                 FROM entries e WHERE e.journal_id = j.id) m
             LEFT JOIN payouts po ON j.kind = 'payout_returned' AND po.id = j.correlation_id
             ORDER BY j.created_at {order}, j.id {order}"
        );
        let rows = client
            .query(
                &sql,
                &[
                    &merchant.as_str(),
                    &payable,
                    &PLATFORM_FEE_REVENUE,
                    &window.from,
                    &window.to,
                    &after_id,
                    &after_at,
                    &limit,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                let (net, fee): (i64, i64) = (r.get(5), r.get(6));
                BalanceTransaction {
                    id: r.get(0),
                    kind: kind_of(r.get(1), r.get::<_, Option<&str>>(7)),
                    source: r.get::<_, Option<String>>(2).unwrap_or_default(),
                    amount: net + fee,
                    fee,
                    net,
                    currency: r.get(3),
                    created: r.get(4),
                }
            })
            .collect())
    }

    /// A page of the payments export, oldest first, after `(time, id)`.
    pub async fn payments_page(
        &self,
        merchant: &MerchantId,
        window: &Window,
        after: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<Payment>, StoreError> {
        let client = self.client().await?;
        let (after_at, after_id) = after.map(|(t, id)| (Some(t), Some(id))).unwrap_or((None, None));
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM payments WHERE merchant_id = $1
                       AND ($2::timestamptz IS NULL OR created_at >= $2) AND ($3::timestamptz IS NULL OR created_at < $3)
                       AND ($5::text IS NULL OR (created_at, id) > ($4, $5))
                     ORDER BY created_at, id LIMIT $6"
                ),
                &[&merchant.as_str(), &window.from, &window.to, &after_at, &after_id, &limit],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(payment_from_row).collect()
    }

    /// The payment's receipt token, made at the first call (128 random bits).
    pub async fn receipt_token(&self, payment: &str) -> Result<String, StoreError> {
        let client = self.client().await?;
        let fresh = format!("rcpt_{}", hex::encode(rand::random::<[u8; 16]>()));
        // Two statements: a concurrent first call's row is committed (its insert made this one
        // wait) and visible by the time this one reads.
        client
            .execute(
                "INSERT INTO receipts (token, payment_id) VALUES ($1, $2) ON CONFLICT (payment_id) DO NOTHING",
                &[&fresh, &payment],
            )
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one("SELECT token FROM receipts WHERE payment_id = $1", &[&payment])
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// The payment a receipt token shows, and its merchant's name.
    pub async fn payment_by_receipt(&self, token: &str) -> Result<Option<(Payment, String)>, StoreError> {
        let client = self.client().await?;
        let cols = COLUMNS
            .split(", ")
            .map(|c| format!("p.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let row = client
            .query_opt(
                &format!(
                    "SELECT {cols}, m.name FROM receipts r JOIN payments p ON p.id = r.payment_id
                     JOIN merchants m ON m.id = p.merchant_id WHERE r.token = $1"
                ),
                &[&token],
            )
            .await
            .map_err(pg_error)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let name: String = r.get(r.len() - 1);
                Ok(Some((payment_from_row(&r)?, name)))
            }
        }
    }
}

/// Where a page of balance transactions starts.
#[derive(Debug, Clone, Copy)]
pub enum Cursor<'a> {
    /// The API's order: newest first, after this journal id.
    Newest(Option<&'a str>),
    /// The export's order: oldest first, after (time, journal id).
    Oldest(Option<(DateTime<Utc>, &'a str)>),
}
