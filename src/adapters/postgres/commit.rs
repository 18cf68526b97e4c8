//! The one write path for payments' changes. Everything a transition touches — the payment
//! row, its audit trail, PSP attempts, refunds, the journal with its entries and balances, the
//! outbox and the idempotency record — commits in one transaction (invariant 1), or nothing does.
//!
//! Commits are written in batches (group commit, driven by the ledger shards): many payments'
//! commits share one transaction and one WAL flush. Each table gets ONE multi-row statement per
//! batch (`unnest` of column arrays), so a batch costs about a dozen statements whatever its
//! size; they are pipelined (sent in order without waiting for each answer), and the balances
//! move by one aggregated delta per (account, currency, slot) at the very end, so hot accounts
//! are locked only briefly.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::payments::Attempt;
use super::{pg_error, Db, StoreError};
use crate::domain::ledger::{self, Journal};
use crate::domain::{AttemptId, JournalId, MerchantId, Payment, Refund, Status};

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
    pub fn parse(s: &str) -> Option<AttemptOutcome> {
        [
            AttemptOutcome::Succeeded,
            AttemptOutcome::Failed,
            AttemptOutcome::RequiresAction,
            AttemptOutcome::Pending,
            AttemptOutcome::Rejected,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
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
    /// The fence the request holds: the write lands only while the key still has it.
    pub fence: i64,
}

/// A PSP event this commit applies (or records as changing nothing): its dedupe row.
#[derive(Debug, Clone)]
pub struct ProcessedEvent {
    pub provider: String,
    pub event_id: String,
    pub event_type: String,
    pub raw: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_type: String,
    pub payload: Value,
}

#[derive(Debug, Default, Clone)]
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
    pub processed_event: Option<ProcessedEvent>,
    pub disputes: Vec<crate::domain::Dispute>,
    /// PSP-side facts the state machine could not take, for an operator: (payment, what).
    pub exceptions: Vec<(crate::domain::PaymentId, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The stored payment moved on without us: another incarnation of its actor wrote it.
    #[error("the payment was changed by someone else")]
    Stale,
    /// The idempotency key was taken over by a newer request with the same key: this one no
    /// longer speaks for it.
    #[error("the idempotency key was taken over by a newer request")]
    Fenced,
    /// The ledger could not take the commit (its queue is full, a shard is gone): nothing
    /// was written.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    /// The store failed; unless it says otherwise, the commit may have landed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Clone for CommitError {
    fn clone(&self) -> CommitError {
        match self {
            CommitError::Stale => CommitError::Stale,
            CommitError::Fenced => CommitError::Fenced,
            CommitError::Unavailable(what) => CommitError::Unavailable(what),
            CommitError::Store(e) => CommitError::Store(e.clone()),
        }
    }
}

/// One multi-row statement per table, in the order rows must exist (a payment before its
/// transitions, a journal before its entries). Each takes column arrays.
const PAYMENTS_INSERT: &str = "INSERT INTO payments (id, merchant_id, order_id, status, amount, currency,
        amount_capturable, amount_captured, amount_refunded, refund_pending, amount_disputed, settled, capture_strategy,
        payment_method, psp, psp_reference, client_secret, next_action, failure, customer_id, description, metadata,
        fee_bps, fee_fixed, version, transitions, created_at, updated_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int8[], $8::int8[],
        $9::int8[], $10::int8[], $11::int8[], $12::bool[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
        $18::jsonb[], $19::jsonb[], $20::text[], $21::text[], $22::jsonb[], $23::int4[], $24::int8[], $25::int4[],
        $26::int4[], $27::timestamptz[], $28::timestamptz[])";

/// Only where the stored version is the one before: a row that moved on is not updated, and
/// the missing id in RETURNING tells the batch it lost a race.
const PAYMENTS_UPDATE: &str = "UPDATE payments p SET status = u.status, amount_capturable = u.capturable,
        amount_captured = u.captured, amount_refunded = u.refunded, refund_pending = u.refund_pending,
        amount_disputed = u.disputed, settled = u.settled, payment_method = u.payment_method,
        psp_reference = u.psp_reference, client_secret = u.client_secret, next_action = u.next_action,
        failure = u.failure, version = u.version, transitions = u.transitions, updated_at = u.updated_at
    FROM unnest($1::text[], $2::int4[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
        $9::bool[], $10::text[], $11::text[], $12::text[], $13::jsonb[], $14::jsonb[], $15::int4[], $16::timestamptz[])
        AS u(id, version, status, capturable, captured, refunded, refund_pending, disputed, settled, payment_method,
             psp_reference, client_secret, next_action, failure, transitions, updated_at)
    WHERE p.id = u.id AND p.version = u.version - 1
    RETURNING p.id";

const REFUNDS: &str =
    "INSERT INTO refunds (id, payment_id, merchant_id, amount, currency, status, reason, psp_reference,
        created_at, updated_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
        $9::timestamptz[], $10::timestamptz[])
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, psp_reference = excluded.psp_reference,
        updated_at = excluded.updated_at";

const TRANSITIONS: &str = "INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at)
    SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])";

const ATTEMPTS_START: &str = "INSERT INTO psp_attempts (id, payment_id, operation, amount, refund_id, idempotency_key,
        started_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::timestamptz[])";

const ATTEMPTS_FINISH: &str = "UPDATE psp_attempts a SET outcome = u.outcome, finished_at = u.at
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(id, outcome, at)
    WHERE a.id = u.id AND a.outcome IS NULL";

const JOURNALS: &str = "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])";

const ENTRIES: &str = "INSERT INTO entries (journal_id, account, currency, debit, credit)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])";

const OUTBOX: &str = "INSERT INTO outbox (merchant_id, payment_id, event_type, payload)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])";

/// Only while the key is still in flight and still holds the request's fence: a key taken over
/// by a newer request (its lease ran out while this one waited) is not ours to complete, and
/// the missing row in RETURNING fails the commit as `Fenced`.
const IDEMPOTENCY: &str = "UPDATE idempotency_keys k SET resource_id = coalesce(u.resource_id, k.resource_id),
        response_status = u.status, response_body = u.body
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::bytea[], $6::int8[])
        AS u(merchant_id, key, resource_id, status, body, fence)
    WHERE k.merchant_id = u.merchant_id AND k.key = u.key AND k.response_status IS NULL AND k.fence = u.fence
    RETURNING k.key";

const EXCEPTIONS: &str = "INSERT INTO payment_exceptions (payment_id, merchant_id, detail)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])";

const PROCESSED: &str = "INSERT INTO processed_events (provider, event_id, event_type, payment_id, raw)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[])";

const DISPUTES: &str =
    "INSERT INTO disputes (id, payment_id, merchant_id, psp_reference, amount, currency, status, reason,
        created_at, updated_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::text[],
        $9::timestamptz[], $10::timestamptz[])
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at";

const BALANCES: &str = "INSERT INTO ledger_accounts (account, currency, slot, debit_total, credit_total)
    SELECT a, c, $1, d, k FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[]) AS u(a, c, d, k)
    ON CONFLICT (account, currency, slot) DO UPDATE SET
        debit_total = ledger_accounts.debit_total + excluded.debit_total,
        credit_total = ledger_accounts.credit_total + excluded.credit_total";

/// Every statement of a batch, in the order they run; the indices below name them.
const STATEMENTS: [&str; 14] = [
    PAYMENTS_INSERT,
    PAYMENTS_UPDATE,
    REFUNDS,
    TRANSITIONS,
    ATTEMPTS_START,
    ATTEMPTS_FINISH,
    JOURNALS,
    ENTRIES,
    OUTBOX,
    IDEMPOTENCY,
    BALANCES,
    PROCESSED,
    DISPUTES,
    EXCEPTIONS,
];
const INSERT: usize = 0;
const UPDATE: usize = 1;

/// Column arrays, named by what they hold.
type Text = Vec<String>;
type MaybeText = Vec<Option<String>>;
type Times = Vec<DateTime<Utc>>;
type Amounts = Vec<i64>;
type Bodies = Vec<Option<Vec<u8>>>;

/// The batch as column arrays, one set per statement; each tuple is in its statement's
/// column order.
#[derive(Default)]
struct Columns {
    ins: PaymentColumns,
    upd: PaymentColumns,
    upd_expected: usize,
    /// id, payment_id, merchant_id, amount, currency, status, reason, psp_reference, created_at, updated_at
    refunds: (
        Text,
        Text,
        Text,
        Amounts,
        Text,
        Text,
        MaybeText,
        MaybeText,
        Times,
        Times,
    ),
    /// payment_id, seq, from_status, to_status, cause, at
    transitions: (Text, Vec<i32>, MaybeText, Text, Text, Times),
    /// id, payment_id, operation, amount, refund_id, idempotency_key, started_at
    starts: (Text, Text, Text, Vec<Option<i64>>, MaybeText, MaybeText, Times),
    /// id, outcome, finished_at
    finishes: (Text, Text, Times),
    /// id, payment_id, merchant_id, kind, correlation_id, currency, created_at
    journals: (Text, Text, Text, Text, Text, Text, Times),
    /// journal_id, account, currency, debit, credit
    entries: (Text, Text, Text, Amounts, Amounts),
    /// merchant_id, payment_id, event_type, payload
    outbox: (Text, Text, Text, Vec<Value>),
    /// merchant_id, key, resource_id, response_status, response_body, fence
    idempotency: (Text, Text, MaybeText, Vec<Option<i16>>, Bodies, Vec<i64>),
    /// payment_id, merchant_id, detail
    exceptions: (Text, Text, Text),
    /// provider, event_id, event_type, payment_id, raw
    processed: (Text, Text, Text, MaybeText, Vec<Vec<u8>>),
    /// id, payment_id, merchant_id, psp_reference, amount, currency, status, reason, created_at, updated_at
    disputes: (Text, Text, Text, Text, Amounts, Text, Text, MaybeText, Times, Times),
}

/// The payments table's columns, for inserts and for updates.
#[derive(Default)]
struct PaymentColumns {
    id: Vec<String>,
    merchant_id: Vec<String>,
    order_id: Vec<String>,
    status: Vec<&'static str>,
    amount: Vec<i64>,
    currency: Vec<String>,
    capturable: Vec<i64>,
    captured: Vec<i64>,
    refunded: Vec<i64>,
    refund_pending: Vec<i64>,
    disputed: Vec<i64>,
    settled: Vec<bool>,
    capture_strategy: Vec<&'static str>,
    payment_method: Vec<String>,
    psp: Vec<String>,
    psp_reference: Vec<Option<String>>,
    client_secret: Vec<Option<String>>,
    next_action: Vec<Option<Value>>,
    failure: Vec<Option<Value>>,
    customer_id: Vec<Option<String>>,
    description: Vec<Option<String>>,
    metadata: Vec<Value>,
    fee_bps: Vec<i32>,
    fee_fixed: Vec<i64>,
    version: Vec<i32>,
    transitions: Vec<i32>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
}

impl PaymentColumns {
    fn push(&mut self, p: &Payment) -> Result<(), StoreError> {
        let s = &p.state;
        let json = |v: Option<Result<Value, serde_json::Error>>| v.transpose().map_err(|_| StoreError::Broken);
        self.id.push(p.id.to_string());
        self.merchant_id.push(p.merchant_id.to_string());
        self.order_id.push(p.order_id.clone());
        self.status.push(s.status.as_str());
        self.amount.push(s.amount);
        self.currency.push(p.currency.code().to_owned());
        self.capturable.push(s.capturable);
        self.captured.push(s.captured);
        self.refunded.push(s.refunded);
        self.refund_pending.push(s.refund_pending);
        self.disputed.push(s.disputed);
        self.settled.push(s.settled);
        self.capture_strategy.push(p.capture_strategy.as_str());
        self.payment_method.push(p.payment_method.clone());
        self.psp.push(p.psp.clone());
        self.psp_reference.push(p.psp_reference.clone());
        self.client_secret.push(p.client_secret.clone());
        self.next_action
            .push(json(p.next_action.as_ref().map(serde_json::to_value))?);
        self.failure.push(json(p.failure.as_ref().map(serde_json::to_value))?);
        self.customer_id.push(p.customer_id.clone());
        self.description.push(p.description.clone());
        self.metadata
            .push(serde_json::to_value(&p.metadata).map_err(|_| StoreError::Broken)?);
        self.fee_bps
            .push(i32::try_from(p.fee_bps).map_err(|_| StoreError::Broken)?);
        self.fee_fixed.push(p.fee_fixed);
        self.version.push(p.version);
        self.transitions.push(p.transitions);
        self.created_at.push(p.created_at);
        self.updated_at.push(p.updated_at);
        Ok(())
    }

    fn insert_params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.merchant_id,
            &self.order_id,
            &self.status,
            &self.amount,
            &self.currency,
            &self.capturable,
            &self.captured,
            &self.refunded,
            &self.refund_pending,
            &self.disputed,
            &self.settled,
            &self.capture_strategy,
            &self.payment_method,
            &self.psp,
            &self.psp_reference,
            &self.client_secret,
            &self.next_action,
            &self.failure,
            &self.customer_id,
            &self.description,
            &self.metadata,
            &self.fee_bps,
            &self.fee_fixed,
            &self.version,
            &self.transitions,
            &self.created_at,
            &self.updated_at,
        ]
    }

    fn update_params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.version,
            &self.status,
            &self.capturable,
            &self.captured,
            &self.refunded,
            &self.refund_pending,
            &self.disputed,
            &self.settled,
            &self.payment_method,
            &self.psp_reference,
            &self.client_secret,
            &self.next_action,
            &self.failure,
            &self.transitions,
            &self.updated_at,
        ]
    }
}

impl Columns {
    fn of(batch: &[&Commit]) -> Result<Columns, StoreError> {
        let mut c = Columns::default();
        for commit in batch {
            let Some(p) = commit.payment.as_ref() else { continue };
            let at = p.updated_at;
            if p.version == 1 {
                c.ins.push(p)?;
            } else {
                c.upd.push(p)?;
                c.upd_expected += 1;
            }
            for r in &commit.refunds {
                c.refunds.0.push(r.id.to_string());
                c.refunds.1.push(r.payment_id.to_string());
                c.refunds.2.push(r.merchant_id.to_string());
                c.refunds.3.push(r.amount.minor);
                c.refunds.4.push(r.amount.currency.code().to_owned());
                c.refunds.5.push(r.status.as_str().to_owned());
                c.refunds.6.push(r.reason.clone());
                c.refunds.7.push(r.psp_reference.clone());
                c.refunds.8.push(r.created_at);
                c.refunds.9.push(r.updated_at);
            }
            if let Some(t) = &commit.transition {
                c.transitions.0.push(p.id.to_string());
                c.transitions.1.push(t.seq);
                c.transitions.2.push(t.from.map(|s| s.as_str().to_owned()));
                c.transitions.3.push(t.to.as_str().to_owned());
                c.transitions.4.push(t.cause.clone());
                c.transitions.5.push(at);
            }
            if let Some(a) = &commit.attempt_started {
                let (operation, amount) = a.operation();
                c.starts.0.push(a.id.to_string());
                c.starts.1.push(p.id.to_string());
                c.starts.2.push(operation.to_owned());
                c.starts.3.push(amount);
                c.starts.4.push(a.refund_id.as_ref().map(|r| r.to_string()));
                c.starts.5.push(a.idem_key.clone());
                c.starts.6.push(at);
            }
            if let Some((id, outcome)) = &commit.attempt_finished {
                c.finishes.0.push(id.to_string());
                c.finishes.1.push(outcome.as_str().to_owned());
                c.finishes.2.push(at);
            }
            if let Some(j) = &commit.journal {
                // Invariant 2, asserted in code before the database checks it again at commit.
                if !ledger::is_balanced(&j.entries) {
                    tracing::error!(payment_id = %p.id, kind = j.kind.as_str(), "refusing an unbalanced journal");
                    return Err(StoreError::Broken);
                }
                let id = JournalId::generate().to_string();
                for e in &j.entries {
                    c.entries.0.push(id.clone());
                    c.entries.1.push(e.account.clone());
                    c.entries.2.push(j.currency.code().to_owned());
                    c.entries.3.push(e.debit);
                    c.entries.4.push(e.credit);
                }
                c.journals.0.push(id);
                c.journals.1.push(p.id.to_string());
                c.journals.2.push(p.merchant_id.to_string());
                c.journals.3.push(j.kind.as_str().to_owned());
                c.journals.4.push(j.correlation_id.clone());
                c.journals.5.push(j.currency.code().to_owned());
                c.journals.6.push(at);
            }
            for e in &commit.outbox {
                c.outbox.0.push(p.merchant_id.to_string());
                c.outbox.1.push(p.id.to_string());
                c.outbox.2.push(e.event_type.clone());
                c.outbox.3.push(e.payload.clone());
            }
            if let Some(e) = &commit.processed_event {
                c.processed.0.push(e.provider.clone());
                c.processed.1.push(e.event_id.clone());
                c.processed.2.push(e.event_type.clone());
                c.processed.3.push(Some(p.id.to_string()));
                c.processed.4.push(e.raw.clone());
            }
            for d in &commit.disputes {
                c.disputes.0.push(d.id.to_string());
                c.disputes.1.push(d.payment_id.to_string());
                c.disputes.2.push(d.merchant_id.to_string());
                c.disputes.3.push(d.psp_reference.clone());
                c.disputes.4.push(d.amount.minor);
                c.disputes.5.push(d.amount.currency.code().to_owned());
                c.disputes.6.push(d.status.as_str().to_owned());
                c.disputes.7.push(d.reason.clone());
                c.disputes.8.push(d.created_at);
                c.disputes.9.push(d.updated_at);
            }
            if let Some(i) = &commit.idempotency {
                c.idempotency.0.push(i.merchant_id.to_string());
                c.idempotency.1.push(i.key.clone());
                c.idempotency.2.push(i.resource_id.clone());
                c.idempotency.3.push(i.response.as_ref().map(|(s, _)| *s as i16));
                c.idempotency.4.push(i.response.as_ref().map(|(_, b)| b.clone()));
                c.idempotency.5.push(i.fence);
            }
            for (payment, detail) in &commit.exceptions {
                c.exceptions.0.push(payment.to_string());
                c.exceptions.1.push(p.merchant_id.to_string());
                c.exceptions.2.push(detail.clone());
            }
        }
        Ok(c)
    }
}

/// How many rows a statement touched, and whether that count is a verdict on the batch.
type Pending<'a> = Pin<Box<dyn Future<Output = Result<Option<u64>, tokio_postgres::Error>> + 'a>>;

impl Db {
    /// Commits one payment's change in its own transaction.
    pub async fn commit(&self, c: &Commit) -> Result<(), CommitError> {
        self.commit_batch(&[c], 0).await
    }

    /// Commits every change of `batch` in ONE transaction, or none. Balances move in `slot`
    /// (the writing shard's own balance rows). `Stale` if any payment lost a write race; the
    /// caller then retries the commits one by one so that only the stale one fails. A batch
    /// never holds two commits of one payment: its actor waits for each commit.
    pub async fn commit_batch(&self, batch: &[&Commit], slot: i16) -> Result<(), CommitError> {
        let cols = Columns::of(batch)?;
        let deltas = aggregate(batch)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(pg_error)?;
        let tx = &txn;
        // Prepared first (cached per connection), so the executes below go out strictly in order.
        let mut st = Vec::with_capacity(STATEMENTS.len());
        for sql in STATEMENTS {
            st.push(tx.prepare_cached(sql).await.map_err(pg_error)?);
        }
        let mut pending: Vec<Pending<'_>> = Vec::with_capacity(STATEMENTS.len());
        if !cols.ins.id.is_empty() {
            pending.push(job(tx, &st[INSERT], false, cols.ins.insert_params()));
        }
        let mut stale_check = None;
        if !cols.upd.id.is_empty() {
            stale_check = Some(pending.len());
            pending.push(job(tx, &st[UPDATE], true, cols.upd.update_params()));
        }
        let r = &cols.refunds;
        if !r.0.is_empty() {
            pending.push(job(
                tx,
                &st[2],
                false,
                vec![&r.0, &r.1, &r.2, &r.3, &r.4, &r.5, &r.6, &r.7, &r.8, &r.9],
            ));
        }
        let t = &cols.transitions;
        if !t.0.is_empty() {
            pending.push(job(tx, &st[3], false, vec![&t.0, &t.1, &t.2, &t.3, &t.4, &t.5]));
        }
        let a = &cols.starts;
        if !a.0.is_empty() {
            pending.push(job(tx, &st[4], false, vec![&a.0, &a.1, &a.2, &a.3, &a.4, &a.5, &a.6]));
        }
        let f = &cols.finishes;
        if !f.0.is_empty() {
            pending.push(job(tx, &st[5], false, vec![&f.0, &f.1, &f.2]));
        }
        let (j, e) = (&cols.journals, &cols.entries);
        if !j.0.is_empty() {
            pending.push(job(tx, &st[6], false, vec![&j.0, &j.1, &j.2, &j.3, &j.4, &j.5, &j.6]));
            pending.push(job(tx, &st[7], false, vec![&e.0, &e.1, &e.2, &e.3, &e.4]));
        }
        let o = &cols.outbox;
        if !o.0.is_empty() {
            pending.push(job(tx, &st[8], false, vec![&o.0, &o.1, &o.2, &o.3]));
        }
        let i = &cols.idempotency;
        let mut fence_check = None;
        if !i.0.is_empty() {
            fence_check = Some(pending.len());
            pending.push(job(tx, &st[9], true, vec![&i.0, &i.1, &i.2, &i.3, &i.4, &i.5]));
        }
        let x = &cols.exceptions;
        if !x.0.is_empty() {
            pending.push(job(tx, &st[13], false, vec![&x.0, &x.1, &x.2]));
        }
        let e = &cols.processed;
        if !e.0.is_empty() {
            pending.push(job(tx, &st[11], false, vec![&e.0, &e.1, &e.2, &e.3, &e.4]));
        }
        let d = &cols.disputes;
        if !d.0.is_empty() {
            pending.push(job(
                tx,
                &st[12],
                false,
                vec![&d.0, &d.1, &d.2, &d.3, &d.4, &d.5, &d.6, &d.7, &d.8, &d.9],
            ));
        }
        // One connection runs them in the order they were sent.
        let results = futures_util::future::join_all(pending).await;
        // A payment update that matched fewer rows than asked means a payment moved on: that
        // explains any error after it (a duplicate audit-trail seq, say), so it wins.
        let count = |at: Option<usize>| at.and_then(|k| results[k].as_ref().ok().copied().flatten());
        if matches!(count(stale_check), Some(n) if n as usize != cols.upd_expected) {
            return Err(CommitError::Stale);
        }
        if matches!(count(fence_check), Some(n) if n as usize != cols.idempotency.0.len()) {
            return Err(CommitError::Fenced);
        }
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(pg_error(e).into());
        }
        if !deltas.is_empty() {
            let accounts: Vec<&str> = deltas.keys().map(|(a, _)| a.as_str()).collect();
            let currencies: Vec<&str> = deltas.keys().map(|(_, c)| c.as_str()).collect();
            let debits: Vec<i64> = deltas.values().map(|d| d.0).collect();
            let credits: Vec<i64> = deltas.values().map(|d| d.1).collect();
            txn.execute(&st[10], &[&slot, &accounts, &currencies, &debits, &credits])
                .await
                .map_err(pg_error)?;
        }
        txn.commit().await.map_err(pg_error)?;
        Ok(())
    }
}

/// One statement of a batch, to be run in order with the others. `counted`: its rows are
/// returned and counted (the payment update's lost-race check).
fn job<'a>(
    tx: &'a deadpool_postgres::Transaction<'a>,
    statement: &'a tokio_postgres::Statement,
    counted: bool,
    params: Vec<&'a (dyn ToSql + Sync)>,
) -> Pending<'a> {
    Box::pin(async move {
        if counted {
            tx.query(statement, &params).await.map(|rows| Some(rows.len() as u64))
        } else {
            tx.execute(statement, &params).await.map(|_| None)
        }
    })
}

/// (Σ debit, Σ credit) per (account, currency).
type Deltas = BTreeMap<(String, String), (i64, i64)>;

/// One delta per (account, currency) over the whole batch, in sorted order so that two
/// transactions can never deadlock on balance rows.
fn aggregate(batch: &[&Commit]) -> Result<Deltas, StoreError> {
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
            d.0 = d.0.checked_add(e.debit).ok_or(StoreError::Broken)?;
            d.1 = d.1.checked_add(e.credit).ok_or(StoreError::Broken)?;
        }
    }
    Ok(deltas)
}
