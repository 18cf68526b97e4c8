//! The one write path for payments' changes. Everything a transition touches — the payment
//! row, its audit trail, PSP attempts, refunds, the journal with its entries and balances, the
//! outbox and the idempotency record — commits in one transaction (invariant 1), or nothing does.
//!
//! Commits are written in batches (group commit, driven by the ledger shards): many payments'
//! commits share one transaction and one WAL flush. Their statements are pipelined — sent in
//! order without waiting for each answer — and the balances move by one aggregated delta per
//! (account, currency, slot) at the very end, so hot accounts are locked only briefly.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chrono::Utc;
use serde_json::Value;
use tokio_postgres::Statement;

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

impl Clone for CommitError {
    fn clone(&self) -> CommitError {
        match self {
            CommitError::Stale => CommitError::Stale,
            CommitError::Api(e) => CommitError::Api(e.clone()),
        }
    }
}

/// Every statement a commit may need, prepared once per connection (deadpool caches them).
struct Statements {
    payment_insert: Statement,
    payment_update: Statement,
    transition: Statement,
    refund: Statement,
    attempt_start: Statement,
    attempt_finish: Statement,
    journal: Statement,
    entries: Statement,
    outbox: Statement,
    idempotency: Statement,
    balances: Statement,
}

impl Statements {
    async fn prepare(tx: &deadpool_postgres::Transaction<'_>) -> Result<Statements, ApiError> {
        let p = |sql: String| async move { tx.prepare_cached(&sql).await.map_err(pg_error) };
        Ok(Statements {
            payment_insert: p(format!(
                "INSERT INTO payments ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                 $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)",
                super::payments::COLUMNS
            ))
            .await?,
            payment_update: p("UPDATE payments SET status = $3, amount_capturable = $4, amount_captured = $5,
                     amount_refunded = $6, refund_pending = $7, amount_disputed = $8, settled = $9, payment_method = $10,
                     psp_reference = $11, client_secret = $12, next_action = $13, failure = $14, version = $2,
                     transitions = $15, updated_at = $16
                 WHERE id = $1 AND version = $2 - 1"
                .into())
            .await?,
            transition: p("INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at)
                 VALUES ($1, $2, $3, $4, $5, $6)"
                .into())
            .await?,
            refund: p("INSERT INTO refunds (id, payment_id, merchant_id, amount, currency, status, reason, psp_reference,
                     created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, psp_reference = excluded.psp_reference,
                     updated_at = excluded.updated_at"
                .into())
            .await?,
            attempt_start: p("INSERT INTO psp_attempts (id, payment_id, operation, amount, refund_id, idempotency_key,
                     started_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                .into())
            .await?,
            attempt_finish: p(
                "UPDATE psp_attempts SET outcome = $2, finished_at = $3 WHERE id = $1 AND outcome IS NULL".into()
            )
            .await?,
            journal: p("INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
                .into())
            .await?,
            entries: p("INSERT INTO entries (journal_id, account, currency, debit, credit)
                 SELECT $1, a, $2, d, c FROM unnest($3::text[], $4::bigint[], $5::bigint[]) AS u(a, d, c)"
                .into())
            .await?,
            outbox: p(
                "INSERT INTO outbox (merchant_id, payment_id, event_type, payload) VALUES ($1, $2, $3, $4)".into()
            )
            .await?,
            idempotency: p("UPDATE idempotency_keys SET resource_id = coalesce($3, resource_id), response_status = $4,
                     response_body = $5
                 WHERE merchant_id = $1 AND key = $2 AND response_status IS NULL"
                .into())
            .await?,
            balances: p("INSERT INTO ledger_accounts (account, currency, slot, debit_total, credit_total)
                 SELECT a, c, $1, d, k FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS u(a, c, d, k)
                 ON CONFLICT (account, currency, slot) DO UPDATE SET
                     debit_total = ledger_accounts.debit_total + excluded.debit_total,
                     credit_total = ledger_accounts.credit_total + excluded.credit_total"
                .into())
            .await?,
        })
    }
}

/// Values a commit's statements borrow that are not stored as they are in the commit.
struct Derived {
    next_action: Option<Value>,
    failure: Option<Value>,
    metadata: Value,
    fee_bps: i32,
    journal_id: String,
    accounts: Vec<String>,
    debits: Vec<i64>,
    credits: Vec<i64>,
    idem_status: Option<i16>,
}

impl Derived {
    fn of(c: &Commit) -> Result<Derived, ApiError> {
        let json = |v: Option<Value>| v;
        let p = c.payment.as_ref();
        let j = c.journal.as_ref();
        if let Some(j) = j {
            // Invariant 2, asserted in code before the database checks it again at commit.
            if !ledger::is_balanced(&j.entries) {
                tracing::error!(kind = j.kind.as_str(), "refusing an unbalanced journal");
                return Err(ApiError::Internal);
            }
        }
        Ok(Derived {
            next_action: json(
                p.and_then(|p| p.next_action.as_ref())
                    .and_then(|n| serde_json::to_value(n).ok()),
            ),
            failure: json(
                p.and_then(|p| p.failure.as_ref())
                    .and_then(|f| serde_json::to_value(f).ok()),
            ),
            metadata: p
                .map(|p| serde_json::to_value(&p.metadata).unwrap_or_default())
                .unwrap_or_default(),
            fee_bps: p.map(|p| p.fee_bps as i32).unwrap_or_default(),
            journal_id: JournalId::generate().to_string(),
            accounts: j
                .map(|j| j.entries.iter().map(|e| e.account.clone()).collect())
                .unwrap_or_default(),
            debits: j
                .map(|j| j.entries.iter().map(|e| e.debit).collect())
                .unwrap_or_default(),
            credits: j
                .map(|j| j.entries.iter().map(|e| e.credit).collect())
                .unwrap_or_default(),
            idem_status: c
                .idempotency
                .as_ref()
                .and_then(|i| i.response.as_ref())
                .map(|(s, _)| *s as i16),
        })
    }
}

/// What a pipelined statement was, to read its row count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    PaymentUpdate,
    Other,
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<(Kind, u64), tokio_postgres::Error>> + 'a>>;

impl Db {
    /// Commits one payment's change in its own transaction.
    pub async fn commit(&self, c: &Commit) -> Result<(), CommitError> {
        self.commit_batch(&[c], 0).await
    }

    /// Commits every change of `batch` in ONE transaction, or none. Balances move in `slot`
    /// (the writing shard's own balance rows). `Stale` if any payment lost a write race; the
    /// caller then retries the commits one by one so that only the stale one fails.
    pub async fn commit_batch(&self, batch: &[&Commit], slot: i16) -> Result<(), CommitError> {
        let derived = batch.iter().map(|c| Derived::of(c)).collect::<Result<Vec<_>, _>>()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let st = Statements::prepare(&tx).await?;
        let mut pending: Vec<Pending<'_>> = Vec::with_capacity(batch.len() * 8);
        for (c, d) in batch.iter().zip(&derived) {
            queue_commit(&tx, &st, c, d, &mut pending);
        }
        // Sent in order on one connection and run in order: an insert always precedes the rows
        // that reference it.
        let results = futures_util::future::join_all(pending).await;
        // A payment update that matched no row means the payment moved on: that explains any
        // error after it (a duplicate audit-trail seq, say), so it wins.
        if results
            .iter()
            .any(|r| matches!(r, Ok((Kind::PaymentUpdate, n)) if *n != 1))
        {
            return Err(CommitError::Stale);
        }
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(pg_error(e).into());
        }
        let deltas = aggregate(batch)?;
        if !deltas.is_empty() {
            let accounts: Vec<&str> = deltas.keys().map(|(a, _)| a.as_str()).collect();
            let currencies: Vec<&str> = deltas.keys().map(|(_, c)| c.as_str()).collect();
            let debits: Vec<i64> = deltas.values().map(|d| d.0).collect();
            let credits: Vec<i64> = deltas.values().map(|d| d.1).collect();
            tx.execute(&st.balances, &[&slot, &accounts, &currencies, &debits, &credits])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }
}

/// (Σ debit, Σ credit) per (account, currency).
type Deltas = BTreeMap<(String, String), (i64, i64)>;

/// One delta per (account, currency) over the whole batch, in sorted order so that two
/// transactions can never deadlock on balance rows.
fn aggregate(batch: &[&Commit]) -> Result<Deltas, ApiError> {
    let mut deltas = Deltas::new();
    for j in batch
        .iter()
        .filter(|c| c.payment.is_some())
        .filter_map(|c| c.journal.as_ref())
    {
        for e in &j.entries {
            let d = deltas
                .entry((e.account.clone(), j.currency.code().to_owned()))
                .or_default();
            d.0 = d.0.checked_add(e.debit).ok_or(ApiError::Internal)?;
            d.1 = d.1.checked_add(e.credit).ok_or(ApiError::Internal)?;
        }
    }
    Ok(deltas)
}

/// Queues every statement of one commit, in dependency order.
fn queue_commit<'a>(
    tx: &'a deadpool_postgres::Transaction<'a>,
    st: &'a Statements,
    c: &'a Commit,
    d: &'a Derived,
    out: &mut Vec<Pending<'a>>,
) {
    let at = c.payment.as_ref().map(|p| p.updated_at).unwrap_or_else(Utc::now);
    let Some(p) = c.payment.as_ref() else { return };
    let s = &p.state;
    if p.version == 1 {
        out.push(Box::pin(async move {
            let n = tx
                .execute(
                    &st.payment_insert,
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
                        &d.next_action,
                        &d.failure,
                        &p.customer_id,
                        &p.description,
                        &d.metadata,
                        &d.fee_bps,
                        &p.fee_fixed,
                        &p.version,
                        &p.transitions,
                        &p.created_at,
                        &p.updated_at,
                    ],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
    } else {
        out.push(Box::pin(async move {
            let n = tx
                .execute(
                    &st.payment_update,
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
                        &d.next_action,
                        &d.failure,
                        &p.transitions,
                        &p.updated_at,
                    ],
                )
                .await?;
            Ok((Kind::PaymentUpdate, n))
        }));
    }
    if let Some(t) = &c.transition {
        out.push(Box::pin(async move {
            let from = t.from.map(Status::as_str);
            let n = tx
                .execute(
                    &st.transition,
                    &[&p.id.as_str(), &t.seq, &from, &t.to.as_str(), &t.cause, &at],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    for r in &c.refunds {
        out.push(Box::pin(async move {
            let n = tx
                .execute(
                    &st.refund,
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
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    if let Some(a) = &c.attempt_started {
        out.push(Box::pin(async move {
            let (operation, amount) = a.operation();
            let refund_id = a.refund_id.as_ref().map(|r| r.as_str());
            let n = tx
                .execute(
                    &st.attempt_start,
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
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    if let Some((id, outcome)) = &c.attempt_finished {
        out.push(Box::pin(async move {
            let n = tx
                .execute(&st.attempt_finish, &[&id.as_str(), &outcome.as_str(), &at])
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    if let Some(j) = &c.journal {
        out.push(Box::pin(async move {
            let currency = j.currency.code();
            let n = tx
                .execute(
                    &st.journal,
                    &[
                        &d.journal_id,
                        &p.id.as_str(),
                        &p.merchant_id.as_str(),
                        &j.kind.as_str(),
                        &j.correlation_id,
                        &currency,
                        &at,
                    ],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
        out.push(Box::pin(async move {
            let currency = j.currency.code();
            let n = tx
                .execute(
                    &st.entries,
                    &[&d.journal_id, &currency, &d.accounts, &d.debits, &d.credits],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    for e in &c.outbox {
        out.push(Box::pin(async move {
            let n = tx
                .execute(
                    &st.outbox,
                    &[&p.merchant_id.as_str(), &p.id.as_str(), &e.event_type, &e.payload],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
    }
    if let Some(i) = &c.idempotency {
        out.push(Box::pin(async move {
            let body = i.response.as_ref().map(|(_, b)| b.as_slice());
            let n = tx
                .execute(
                    &st.idempotency,
                    &[&i.merchant_id.as_str(), &i.key, &i.resource_id, &d.idem_status, &body],
                )
                .await?;
            Ok((Kind::Other, n))
        }));
    }
}
