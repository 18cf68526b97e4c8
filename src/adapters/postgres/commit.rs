//! The one write path for a payment's changes. Everything a transition touches — the payment
//! row, its audit trail, PSP attempts, refunds, the journal with its entries and balances, the
//! outbox and the idempotency record — commits in ONE transaction (invariant 1), or nothing does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::payments::Attempt;
use super::{pg_error, Db};
use crate::domain::ledger::{self, Journal};
use crate::domain::{AttemptId, JournalId, MerchantId, Payment, Refund, Status};
use crate::error::ApiError;

/// A status change for the audit trail.
#[derive(Debug, Clone)]
pub struct Transition {
    pub seq: i32,
    pub from: Option<Status>,
    pub to: Status,
    /// The API call or PSP event that caused it, e.g. `api.capture`.
    pub cause: String,
}

/// How a PSP attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    Failed,
    RequiresAction,
    Pending,
    /// The PSP refused the request itself (an unknown payment method, say): nothing happened.
    Rejected,
}

impl AttemptOutcome {
    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::RequiresAction => "requires_action",
            AttemptOutcome::Pending => "pending",
            AttemptOutcome::Rejected => "rejected",
        }
    }
}

/// The response an idempotent request will replay, written with the change it reports.
#[derive(Debug, Clone)]
pub struct IdempotencyWrite {
    pub merchant_id: MerchantId,
    pub key: String,
    /// The object the request created, so a retry after a crash finds it instead of making another.
    pub resource_id: Option<String>,
    /// Status and body; `None` while the request goes on (a create that will now confirm).
    pub response: Option<(u16, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_type: String,
    pub payload: Value,
}

#[derive(Debug, Default)]
pub struct Commit {
    /// The payment as this commit leaves it. `version` 1 inserts it; any other version updates
    /// the row only if it still holds `version - 1`.
    pub payment: Option<Payment>,
    pub transition: Option<Transition>,
    pub attempt_started: Option<Attempt>,
    pub attempt_finished: Option<(AttemptId, AttemptOutcome)>,
    pub refunds: Vec<Refund>,
    pub journal: Option<Journal>,
    pub outbox: Vec<OutboxEvent>,
    pub idempotency: Option<IdempotencyWrite>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The stored payment moved on without us: another incarnation of its actor wrote it.
    #[error("the payment was changed by someone else")]
    Stale,
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl Db {
    pub async fn commit(&self, c: &Commit) -> Result<(), CommitError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let at = c.payment.as_ref().map(|p| p.updated_at).unwrap_or_else(Utc::now);
        if let Some(p) = &c.payment {
            write_payment(&tx, p).await?;
        }
        if let (Some(t), Some(p)) = (&c.transition, &c.payment) {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .await
                .map_err(pg_error)?;
            let from = t.from.map(Status::as_str);
            tx.execute(&stmt, &[&p.id.as_str(), &t.seq, &from, &t.to.as_str(), &t.cause, &at])
                .await
                .map_err(pg_error)?;
        }
        for r in &c.refunds {
            write_refund(&tx, r).await?;
        }
        if let (Some(a), Some(p)) = (&c.attempt_started, &c.payment) {
            let (operation, amount) = a.operation();
            let refund_id = a.refund_id.as_ref().map(|r| r.as_str());
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO psp_attempts (id, payment_id, operation, amount, refund_id, idempotency_key, started_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .await
                .map_err(pg_error)?;
            tx.execute(
                &stmt,
                &[
                    &a.id.as_str(),
                    &p.id.as_str(),
                    &operation,
                    &amount,
                    &refund_id,
                    &a.idem_key,
                    &at,
                ],
            )
            .await
            .map_err(pg_error)?;
        }
        if let Some((id, outcome)) = &c.attempt_finished {
            let stmt = tx
                .prepare_cached(
                    "UPDATE psp_attempts SET outcome = $2, finished_at = $3 WHERE id = $1 AND outcome IS NULL",
                )
                .await
                .map_err(pg_error)?;
            tx.execute(&stmt, &[&id.as_str(), &outcome.as_str(), &at])
                .await
                .map_err(pg_error)?;
        }
        if let (Some(j), Some(p)) = (&c.journal, &c.payment) {
            write_journal(&tx, p, j, at).await?;
        }
        let journal = c.journal.as_ref().filter(|_| c.payment.is_some());
        for e in &c.outbox {
            let merchant = c.payment.as_ref().map(|p| p.merchant_id.as_str()).unwrap_or_default();
            let payment_id = c.payment.as_ref().map(|p| p.id.as_str());
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO outbox (merchant_id, payment_id, event_type, payload) VALUES ($1, $2, $3, $4)",
                )
                .await
                .map_err(pg_error)?;
            tx.execute(&stmt, &[&merchant, &payment_id, &e.event_type, &e.payload])
                .await
                .map_err(pg_error)?;
        }
        if let Some(i) = &c.idempotency {
            let (status, body) = match &i.response {
                Some((s, b)) => (Some(*s as i16), Some(b.as_slice())),
                None => (None, None),
            };
            let stmt = tx
                .prepare_cached(
                    "UPDATE idempotency_keys SET resource_id = coalesce($3, resource_id), response_status = $4, response_body = $5
                     WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL",
                )
                .await
                .map_err(pg_error)?;
            tx.execute(
                &stmt,
                &[&i.merchant_id.as_str(), &i.key, &i.resource_id, &status, &body],
            )
            .await
            .map_err(pg_error)?;
        }
        if let Some(j) = journal {
            apply_balances(&tx, j).await?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }
}

async fn write_payment(tx: &deadpool_postgres::Transaction<'_>, p: &Payment) -> Result<(), CommitError> {
    let s = &p.state;
    let next_action = p
        .next_action
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|_| ApiError::Internal)?;
    let failure = p
        .failure
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|_| ApiError::Internal)?;
    let metadata = serde_json::to_value(&p.metadata).map_err(|_| ApiError::Internal)?;
    let fee_bps = p.fee_bps as i32;
    if p.version == 1 {
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO payments ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)",
                super::payments::COLUMNS
            ))
            .await
            .map_err(pg_error)?;
        tx.execute(
            &stmt,
            &[
                &p.id.as_str(),
                &p.merchant_id.as_str(),
                &p.order_id,
                &s.status.as_str(),
                &s.amount,
                &p.currency.code(),
                &s.capturable,
                &s.captured,
                &s.refunded,
                &s.refund_pending,
                &s.disputed,
                &s.settled,
                &p.capture_strategy.as_str(),
                &p.payment_method,
                &p.psp,
                &p.psp_reference,
                &p.client_secret,
                &next_action,
                &failure,
                &p.customer_id,
                &p.description,
                &metadata,
                &fee_bps,
                &p.fee_fixed,
                &p.version,
                &p.transitions,
                &p.created_at,
                &p.updated_at,
            ],
        )
        .await
        .map_err(pg_error)?;
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE payments SET status = $3, amount_capturable = $4, amount_captured = $5, amount_refunded = $6,
                 refund_pending = $7, amount_disputed = $8, settled = $9, payment_method = $10, psp_reference = $11,
                 client_secret = $12, next_action = $13, failure = $14, version = $2, transitions = $15, updated_at = $16
             WHERE id = $1 AND version = $2 - 1",
        )
        .await
        .map_err(pg_error)?;
    let n = tx
        .execute(
            &stmt,
            &[
                &p.id.as_str(),
                &p.version,
                &s.status.as_str(),
                &s.capturable,
                &s.captured,
                &s.refunded,
                &s.refund_pending,
                &s.disputed,
                &s.settled,
                &p.payment_method,
                &p.psp_reference,
                &p.client_secret,
                &next_action,
                &failure,
                &p.transitions,
                &p.updated_at,
            ],
        )
        .await
        .map_err(pg_error)?;
    if n == 1 {
        Ok(())
    } else {
        Err(CommitError::Stale)
    }
}

async fn write_refund(tx: &deadpool_postgres::Transaction<'_>, r: &Refund) -> Result<(), CommitError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refunds (id, payment_id, merchant_id, amount, currency, status, reason, psp_reference, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, psp_reference = excluded.psp_reference,
                 updated_at = excluded.updated_at",
        )
        .await
        .map_err(pg_error)?;
    tx.execute(
        &stmt,
        &[
            &r.id.as_str(),
            &r.payment_id.as_str(),
            &r.merchant_id.as_str(),
            &r.amount.minor,
            &r.amount.currency.code(),
            &r.status.as_str(),
            &r.reason,
            &r.psp_reference,
            &r.created_at,
            &r.updated_at,
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// Inserts the journal and its entries. Balances follow in [`apply_balances`], in sorted
/// account order so that two commits can never deadlock on them.
async fn write_journal(
    tx: &deadpool_postgres::Transaction<'_>,
    p: &Payment,
    j: &Journal,
    at: DateTime<Utc>,
) -> Result<(), CommitError> {
    // Invariant 2, asserted in code before the database checks it again at commit.
    if !ledger::is_balanced(&j.entries) {
        tracing::error!(payment_id = %p.id, kind = j.kind.as_str(), "refusing an unbalanced journal");
        return Err(ApiError::Internal.into());
    }
    let id = JournalId::generate();
    let currency = j.currency.code();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(pg_error)?;
    tx.execute(
        &stmt,
        &[
            &id.as_str(),
            &p.id.as_str(),
            &p.merchant_id.as_str(),
            &j.kind.as_str(),
            &j.correlation_id,
            &currency,
            &at,
        ],
    )
    .await
    .map_err(pg_error)?;

    let accounts: Vec<&str> = j.entries.iter().map(|e| e.account.as_str()).collect();
    let debits: Vec<i64> = j.entries.iter().map(|e| e.debit).collect();
    let credits: Vec<i64> = j.entries.iter().map(|e| e.credit).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO entries (journal_id, account, currency, debit, credit)
             SELECT $1, a, $2, d, c FROM unnest($3::text[], $4::bigint[], $5::bigint[]) AS u(a, d, c)",
        )
        .await
        .map_err(pg_error)?;
    tx.execute(&stmt, &[&id.as_str(), &currency, &accounts, &debits, &credits])
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Moves each balance the journal touches by one aggregated delta. Called last in the
/// transaction: hot accounts (`psp_clearing`, `platform_fee_revenue`) are locked from here to
/// COMMIT, so the shorter that is, the more transactions pass through them.
async fn apply_balances(tx: &deadpool_postgres::Transaction<'_>, j: &Journal) -> Result<(), CommitError> {
    let currency = j.currency.code();
    let mut deltas: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for e in &j.entries {
        let d = deltas.entry(e.account.as_str()).or_default();
        d.0 = d.0.checked_add(e.debit).ok_or(ApiError::Internal)?;
        d.1 = d.1.checked_add(e.credit).ok_or(ApiError::Internal)?;
    }
    let accounts: Vec<&str> = deltas.keys().copied().collect();
    let debits: Vec<i64> = deltas.values().map(|d| d.0).collect();
    let credits: Vec<i64> = deltas.values().map(|d| d.1).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO ledger_accounts (account, currency, debit_total, credit_total)
             SELECT a, $1, d, c FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS u(a, d, c)
             ON CONFLICT (account, currency) DO UPDATE SET
                 debit_total = ledger_accounts.debit_total + excluded.debit_total,
                 credit_total = ledger_accounts.credit_total + excluded.credit_total",
        )
        .await
        .map_err(pg_error)?;
    tx.execute(&stmt, &[&currency, &accounts, &debits, &credits])
        .await
        .map_err(pg_error)?;
    Ok(())
}
