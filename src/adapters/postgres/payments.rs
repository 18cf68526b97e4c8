//! The payments table and its audit trail: loading a payment for its actor, reads for the
//! API. Writes go through [`super::commit`].

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

use super::{pg_error, Db, StoreError};
use crate::domain::payment::PspOp;
use crate::domain::record::timestamp;
use crate::domain::{
    AttemptId, CaptureStrategy, Currency, MerchantId, Payment, PaymentId, PaymentState, RefundId, Status,
};

pub(super) const COLUMNS: &str = "id, merchant_id, order_id, status, amount, currency, amount_capturable, \
    amount_captured, amount_refunded, refund_pending, amount_disputed, settled, capture_strategy, payment_method, \
    psp, psp_reference, client_secret, next_action, failure, customer_id, description, metadata, fee_bps, \
    fee_fixed, version, transitions, created_at, updated_at, customer, card, risk, splits, routing";

/// A PSP call recorded before it was made (docs/DESIGN.md, "Calling the PSP safely").
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: AttemptId,
    pub op: PspOp,
    /// The refund this attempt performs, for `PspOp::Refund`.
    pub refund_id: Option<RefundId>,
    /// The Idempotency-Key of the request that started it.
    pub idem_key: Option<String>,
    /// The connector it goes to; `None`: the merchant's own sandbox connector.
    pub connector_id: Option<String>,
    /// When it was recorded (a PSP keeps an idempotency key's answer only so long).
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Attempt {
    pub fn operation(&self) -> (&'static str, Option<i64>) {
        match self.op {
            PspOp::Authorize => ("authorize", None),
            PspOp::Capture { amount } => ("capture", Some(amount)),
            PspOp::Cancel => ("cancel", None),
            PspOp::Refund { amount } => ("refund", Some(amount)),
        }
    }
}

/// Filters for `GET /api/v1/payments`.
#[derive(Debug, Default)]
pub struct PaymentFilter {
    pub limit: i64,
    pub starting_after: Option<PaymentId>,
    pub status: Option<Status>,
    pub order_id: Option<String>,
    pub created_gte: Option<DateTime<Utc>>,
    pub created_lt: Option<DateTime<Utc>>,
}

pub(super) fn payment_from_row(row: &tokio_postgres::Row) -> Result<Payment, StoreError> {
    let bad = |what: &str| {
        tracing::error!(what, "unreadable payment row");
        StoreError::Broken
    };
    let status: String = row.get(3);
    let currency: String = row.get(5);
    let strategy: String = row.get(12);
    let next_action: Option<Value> = row.get(17);
    let failure: Option<Value> = row.get(18);
    let metadata: Value = row.get(21);
    Ok(Payment {
        id: PaymentId::from_trusted(row.get(0)),
        merchant_id: MerchantId::from_trusted(row.get(1)),
        order_id: row.get(2),
        currency: Currency::parse(&currency).ok_or_else(|| bad("currency"))?,
        state: PaymentState {
            status: Status::parse(&status).ok_or_else(|| bad("status"))?,
            amount: row.get(4),
            capturable: row.get(6),
            captured: row.get(7),
            refunded: row.get(8),
            refund_pending: row.get(9),
            disputed: row.get(10),
            settled: row.get(11),
        },
        capture_strategy: if strategy == "manual" {
            CaptureStrategy::Manual
        } else {
            CaptureStrategy::Automatic
        },
        payment_method: row.get(13),
        psp: row.get(14),
        psp_reference: row.get(15),
        client_secret: row.get(16),
        next_action: next_action
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad("next_action"))?,
        failure: failure
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad("failure"))?,
        customer_id: row.get(19),
        description: row.get(20),
        metadata: serde_json::from_value(metadata).map_err(|_| bad("metadata"))?,
        fee_bps: u32::try_from(row.get::<_, i32>(22)).map_err(|_| bad("fee_bps"))?,
        fee_fixed: row.get(23),
        version: row.get(24),
        transitions: row.get(25),
        created_at: row.get(26),
        updated_at: row.get(27),
        customer: json_column(row.get(28)).map_err(|_| bad("customer"))?,
        card: json_column(row.get(29)).map_err(|_| bad("card"))?,
        risk: json_column(row.get(30)).map_err(|_| bad("risk"))?,
        splits: json_column(row.get(31)).map_err(|_| bad("splits"))?,
        routing: json_column(row.get(32)).map_err(|_| bad("routing"))?,
    })
}

fn json_column<T: serde::de::DeserializeOwned>(v: Option<Value>) -> Result<Option<T>, serde_json::Error> {
    v.map(serde_json::from_value).transpose()
}

fn attempt_from_row(row: &tokio_postgres::Row) -> Result<Attempt, StoreError> {
    let operation: String = row.get(1);
    let amount: Option<i64> = row.get(2);
    let op = match (operation.as_str(), amount) {
        ("authorize", _) => PspOp::Authorize,
        ("capture", Some(amount)) => PspOp::Capture { amount },
        ("cancel", _) => PspOp::Cancel,
        ("refund", Some(amount)) => PspOp::Refund { amount },
        _ => return Err(StoreError::Broken),
    };
    Ok(Attempt {
        id: AttemptId::from_trusted(row.get(0)),
        op,
        refund_id: row.get::<_, Option<String>>(3).map(RefundId::from_trusted),
        idem_key: row.get(4),
        connector_id: row.get(5),
        started_at: row.get(6),
    })
}

/// Where a page of payments with stale attempts ended: the oldest open attempt's start, then
/// the payment's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePlace {
    pub since: chrono::DateTime<chrono::Utc>,
    pub payment: PaymentId,
}

impl Db {
    /// A payment and its PSP attempts that have no outcome yet: what its actor starts from.
    pub async fn load_payment(&self, id: &PaymentId) -> Result<Option<(Payment, Vec<Attempt>)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {COLUMNS} FROM payments WHERE id = $1"))
            .await
            .map_err(pg_error)?;
        let Some(row) = client.query_opt(&stmt, &[&id.as_str()]).await.map_err(pg_error)? else {
            return Ok(None);
        };
        let payment = payment_from_row(&row)?;
        let stmt = client
            .prepare_cached(
                "SELECT id, operation, amount, refund_id, idempotency_key, connector_id, started_at FROM psp_attempts
                 WHERE payment_id = $1 AND outcome IS NULL ORDER BY started_at, id",
            )
            .await
            .map_err(pg_error)?;
        let attempts = client.query(&stmt, &[&id.as_str()]).await.map_err(pg_error)?;
        let attempts = attempts.iter().map(attempt_from_row).collect::<Result<_, _>>()?;
        Ok(Some((payment, attempts)))
    }

    /// The PSP attempt that the request with idempotency key `key` started on the payment: the
    /// last one, when a failover made it start several. Only an attempt started since the key's
    /// record was made (less an hour for clocks): a key used again after its record was purged
    /// is a new request, which an earlier use's attempt does not answer.
    pub async fn attempt_by_key(
        &self,
        payment: &PaymentId,
        key: &str,
    ) -> Result<Option<(Attempt, Option<super::commit::AttemptOutcome>)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, operation, amount, refund_id, idempotency_key, connector_id, started_at, outcome FROM psp_attempts
                 WHERE payment_id = $1 AND idempotency_key = $2
                   AND started_at >= coalesce(
                       (SELECT k.created_at FROM idempotency_keys k JOIN payments p ON k.merchant_id = p.merchant_id
                         WHERE p.id = $1 AND k.key = $2) - interval '1 hour',
                       '-infinity')
                 ORDER BY started_at DESC, id DESC LIMIT 1",
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = client
            .query_opt(&stmt, &[&payment.as_str(), &key])
            .await
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let outcome = match row.get::<_, Option<String>>(7) {
            None => None,
            Some(o) => Some(super::commit::AttemptOutcome::parse(&o).ok_or(StoreError::Broken)?),
        };
        Ok(Some((attempt_from_row(&row)?, outcome)))
    }

    /// Payments with a PSP attempt open for longer than `older_than_ms`: a crash, an outage or
    /// an ambiguous commit left them, and no request has come back for them. The longest
    /// waiting first, at most `limit`, after `after` (the place the previous page ended): the
    /// sweeper pages through all of them over its rounds, so attempts it cannot complete yet
    /// (a connector down, another node's partitions) never keep newer ones from their turn.
    pub async fn payments_with_stale_attempts(
        &self,
        older_than_ms: u64,
        after: Option<&StalePlace>,
        limit: i64,
    ) -> Result<Vec<(PaymentId, MerchantId, StalePlace)>, StoreError> {
        let client = self.client().await?;
        let secs = older_than_ms as f64 / 1000.0;
        let (since, id) = after.map_or((None, ""), |a| (Some(a.since), a.payment.as_str()));
        // payments first: the order in which a batch and a migration (V26) lock the two tables.
        let rows = client
            .query(
                "SELECT p.id, p.merchant_id, min(a.started_at) FROM payments p JOIN psp_attempts a ON a.payment_id = p.id
                 WHERE a.outcome IS NULL AND a.started_at < now() - make_interval(secs => $1)
                 GROUP BY p.id, p.merchant_id
                 HAVING $3::timestamptz IS NULL OR (min(a.started_at), p.id) > ($3::timestamptz, $4::text)
                 ORDER BY min(a.started_at), p.id LIMIT $2",
                &[&secs, &limit, &since, &id],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                let id = PaymentId::from_trusted(r.get(0));
                let place = StalePlace {
                    since: r.get(2),
                    payment: id.clone(),
                };
                (id, MerchantId::from_trusted(r.get(1)), place)
            })
            .collect())
    }

    /// The payment if it belongs to `merchant`; another merchant's payment is simply missing.
    pub async fn payment_for_merchant(
        &self,
        merchant: &MerchantId,
        id: &PaymentId,
    ) -> Result<Option<Payment>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM payments WHERE id = $1 AND merchant_id = $2"
            ))
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&id.as_str(), &merchant.as_str()])
            .await
            .map_err(pg_error)?;
        row.as_ref().map(payment_from_row).transpose()
    }

    pub async fn payment_by_psp_reference(
        &self,
        merchant: &MerchantId,
        psp: &str,
        reference: &str,
    ) -> Result<Option<Payment>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM payments
                 WHERE id = (SELECT payment_id FROM payment_psp_references WHERE psp = $1 AND psp_reference = $2)
                   AND psp = $1 AND psp_reference = $2 AND merchant_id = $3"
            ))
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&psp, &reference, &merchant.as_str()])
            .await
            .map_err(pg_error)?;
        row.as_ref().map(payment_from_row).transpose()
    }

    /// Newest first; `has_more` is read by fetching one row past the limit.
    pub async fn list_payments(
        &self,
        merchant: &MerchantId,
        f: &PaymentFilter,
    ) -> Result<(Vec<Payment>, bool), StoreError> {
        let client = self.client().await?;
        let mut sql = format!("SELECT {COLUMNS} FROM payments WHERE merchant_id = $1");
        let status = f.status.map(|s| s.as_str().to_owned());
        let cursor = f.starting_after.as_ref().map(|c| c.as_str().to_owned());
        let merchant = merchant.as_str().to_owned();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&merchant];
        if let Some(c) = &cursor {
            params.push(c);
            let n = params.len();
            sql += &format!(
                " AND (created_at, id) < (SELECT created_at, id FROM payments WHERE id = ${n} AND merchant_id = $1)"
            );
        }
        if let Some(s) = &status {
            params.push(s);
            sql += &format!(" AND status = ${}", params.len());
        }
        if let Some(o) = &f.order_id {
            params.push(o);
            sql += &format!(" AND order_id = ${}", params.len());
        }
        if let Some(t) = &f.created_gte {
            params.push(t);
            sql += &format!(" AND created_at >= ${}", params.len());
        }
        if let Some(t) = &f.created_lt {
            params.push(t);
            sql += &format!(" AND created_at < ${}", params.len());
        }
        let limit = f.limit + 1;
        params.push(&limit);
        sql += &format!(" ORDER BY created_at DESC, id DESC LIMIT ${}", params.len());
        let rows = client.query(&sql, &params).await.map_err(pg_error)?;
        let mut payments = rows.iter().map(payment_from_row).collect::<Result<Vec<_>, _>>()?;
        let has_more = payments.len() as i64 > f.limit;
        payments.truncate(f.limit as usize);
        Ok((payments, has_more))
    }

    /// The payment's audit trail, oldest first, as docs/API.md's `{ seq, from, to, cause, at }`.
    pub async fn payment_transitions(&self, id: &PaymentId) -> Result<Vec<Value>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT seq, from_status, to_status, cause, at FROM payment_transitions WHERE payment_id = $1 ORDER BY seq")
            .await
            .map_err(pg_error)?;
        let rows = client.query(&stmt, &[&id.as_str()]).await.map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|r| {
                let at: DateTime<Utc> = r.get(4);
                json!({ "seq": r.get::<_, i32>(0), "from": r.get::<_, Option<String>>(1), "to": r.get::<_, String>(2),
                        "cause": r.get::<_, String>(3), "at": timestamp(at) })
            })
            .collect())
    }
}
