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
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Statement;

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
    /// The call never reached the PSP (docs/API.md, "Routing"): nothing happened there.
    Unreachable,
}

impl AttemptOutcome {
    pub fn parse(s: &str) -> Option<AttemptOutcome> {
        [
            AttemptOutcome::Succeeded,
            AttemptOutcome::Failed,
            AttemptOutcome::RequiresAction,
            AttemptOutcome::Pending,
            AttemptOutcome::Rejected,
            AttemptOutcome::Unreachable,
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
            AttemptOutcome::Unreachable => "unreachable",
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
    /// The request's first commit, on a key no claim was made for: it inserts the key's row
    /// (with `resource_id` and `response`), and fails as [`CommitError::KeyHeld`] if a row holds
    /// the key already.
    pub claim: Option<super::idempotency::KeyClaim>,
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
    /// The object as JSON text: a commit carries it to the database, which keeps it as this
    /// text (`outbox.body`, `json`), and nothing reads it back before then.
    pub payload: Box<RawValue>,
}

impl OutboxEvent {
    pub fn new(event_type: impl Into<String>, payload: &impl serde::Serialize) -> OutboxEvent {
        OutboxEvent {
            event_type: event_type.into(),
            // Payloads are JSON trees or objects of strings, numbers and maps: they serialize.
            payload: serde_json::value::to_raw_value(payload).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Commit {
    /// The payment as this commit leaves it. `version` 1 inserts it; any other version updates
    /// the row only if it still holds `version - 1`.
    pub payment: Option<Payment>,
    pub transition: Option<Transition>,
    pub attempt_started: Option<Attempt>,
    pub attempt_finished: Option<(AttemptId, AttemptOutcome)>,
    /// The PSP's reference of the finished attempt, kept on it when the payment does not take
    /// it (an authorization failed over after a soft decline).
    pub attempt_reference: Option<String>,
    pub refunds: Vec<Refund>,
    pub journal: Option<Journal>,
    pub outbox: Vec<OutboxEvent>,
    pub idempotency: Option<IdempotencyWrite>,
    pub processed_event: Option<ProcessedEvent>,
    pub disputes: Vec<crate::domain::Dispute>,
    /// PSP-side facts the state machine could not take, for an operator: (payment, what).
    pub exceptions: Vec<(crate::domain::PaymentId, String)>,
    /// The payment's update changes only its state (`PaymentState`), `version`, `transitions`
    /// and `updated_at`: it is written by a statement that sends only those columns (a
    /// settlement's, at report scale). Whoever sets it must change nothing else of the payment.
    pub state_only: bool,
    /// The payment is as stored, `version` included (a PSP event that moves nothing): none of
    /// it is written, but the commit lands only if the stored row still holds `version`, which
    /// stays locked until the batch ends.
    pub unchanged: bool,
    /// Cluster mode: the lease under which this node's actor writes the payment. The commit
    /// lands only if `partition_fences` still holds it ([`FENCE`]).
    pub lease: Option<crate::adapters::cluster::LeaseToken>,
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
    /// The commit was to claim its request's idempotency key, and a row holds the key already
    /// (another request with it, before or at the same time): nothing was written.
    #[error("the idempotency key is held by another request")]
    KeyHeld,
    /// Cluster mode: the payment's partition is no longer this node's (its lease expired or
    /// moved): nothing was written.
    #[error("the payment's partition moved to another node")]
    Moved,
    /// The ledger could not take the commit (its queue is full, a shard is gone): nothing
    /// was written.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    /// The COMMIT was sent and no answer came (the connection broke): the transaction may
    /// have landed or not. Unlike a failure before it, the batch is not written again.
    #[error("the database did not answer the commit")]
    Unknown,
    /// The store failed; unless it says otherwise, the commit may have landed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Clone for CommitError {
    fn clone(&self) -> CommitError {
        match self {
            CommitError::Stale => CommitError::Stale,
            CommitError::Fenced => CommitError::Fenced,
            CommitError::KeyHeld => CommitError::KeyHeld,
            CommitError::Moved => CommitError::Moved,
            CommitError::Unavailable(what) => CommitError::Unavailable(what),
            CommitError::Unknown => CommitError::Unknown,
            CommitError::Store(e) => CommitError::Store(e.clone()),
        }
    }
}

/// One multi-row statement per table, in the order rows must exist (a payment before its
/// transitions, a journal before its entries). Each takes column arrays.
const PAYMENTS_INSERT: &str = "INSERT INTO payments (id, merchant_id, order_id, status, amount, currency,
        amount_capturable, amount_captured, amount_refunded, refund_pending, amount_disputed, settled, capture_strategy,
        payment_method, psp, psp_reference, client_secret, next_action, failure, customer_id, description, metadata,
        fee_bps, fee_fixed, version, transitions, created_at, updated_at, customer, card, risk, splits, routing)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int8[], $8::int8[],
        $9::int8[], $10::int8[], $11::int8[], $12::bool[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
        $18::jsonb[], $19::jsonb[], $20::text[], $21::text[], $22::jsonb[], $23::int4[], $24::int8[], $25::int4[],
        $26::int4[], $27::timestamptz[], $28::timestamptz[], $29::jsonb[], $30::jsonb[], $31::jsonb[], $32::jsonb[],
        $33::jsonb[])";

/// [`PAYMENTS_UPDATE`] for a commit that changes only the payment's state (`Commit::state_only`).
const PAYMENTS_STATE_UPDATE: &str = "UPDATE payments p SET status = u.status, amount_capturable = u.capturable,
        amount_captured = u.captured, amount_refunded = u.refunded, refund_pending = u.refund_pending,
        amount_disputed = u.disputed, settled = u.settled, version = u.version, transitions = u.transitions,
        updated_at = u.updated_at
    FROM unnest($1::text[], $2::int4[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
        $9::bool[], $10::int4[], $11::timestamptz[])
        AS u(id, version, status, capturable, captured, refunded, refund_pending, disputed, settled, transitions,
             updated_at)
    WHERE p.id = u.id AND p.version = u.version - 1
    RETURNING p.id";

/// A payment the commit leaves as it is: found only if it still holds the version the commit
/// was decided on. `FOR SHARE` keeps it there until the batch ends: a writer that would move
/// it waits, then finds the version it expects (nothing changed it); one that moved it first
/// is seen here (READ COMMITTED re-reads the locked row), and the missing id fails the batch
/// as stale, as an update's would.
const PAYMENTS_CHECK: &str = "SELECT p.id FROM payments p
    JOIN unnest($1::text[], $2::int4[]) AS u(id, version) ON p.id = u.id AND p.version = u.version
    FOR SHARE OF p";

/// Only where the stored version is the one before: a row that moved on is not updated, and
/// the missing id in RETURNING tells the batch it lost a race.
const PAYMENTS_UPDATE: &str = "UPDATE payments p SET status = u.status, amount_capturable = u.capturable,
        amount_captured = u.captured, amount_refunded = u.refunded, refund_pending = u.refund_pending,
        amount_disputed = u.disputed, settled = u.settled, payment_method = u.payment_method,
        psp_reference = u.psp_reference, client_secret = u.client_secret, next_action = u.next_action,
        failure = u.failure, version = u.version, transitions = u.transitions, updated_at = u.updated_at,
        card = u.card, risk = u.risk, splits = u.splits, psp = u.psp, routing = u.routing
    FROM unnest($1::text[], $2::int4[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
        $9::bool[], $10::text[], $11::text[], $12::text[], $13::jsonb[], $14::jsonb[], $15::int4[], $16::timestamptz[],
        $17::jsonb[], $18::jsonb[], $19::jsonb[], $20::text[], $21::jsonb[])
        AS u(id, version, status, capturable, captured, refunded, refund_pending, disputed, settled, payment_method,
             psp_reference, client_secret, next_action, failure, transitions, updated_at, card, risk, splits, psp,
             routing)
    WHERE p.id = u.id AND p.version = u.version - 1
    RETURNING p.id";

const REFUNDS: &str =
    "INSERT INTO refunds (id, payment_id, merchant_id, amount, currency, status, reason, psp_reference,
        created_at, updated_at, reverse_splits, refund_application_fee)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
        $9::timestamptz[], $10::timestamptz[], $11::bool[], $12::bool[])
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, psp_reference = excluded.psp_reference,
        updated_at = excluded.updated_at";

const TRANSITIONS: &str = "INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at)
    SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])";

const ATTEMPTS_START: &str = "INSERT INTO psp_attempts (id, payment_id, operation, amount, refund_id, idempotency_key,
        started_at, connector_id)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::timestamptz[],
        $8::text[])";

const ATTEMPTS_FINISH: &str = "UPDATE psp_attempts a SET outcome = u.outcome, finished_at = u.at,
        psp_reference = coalesce(u.reference, a.psp_reference)
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS u(id, outcome, at, reference)
    WHERE a.id = u.id AND a.finished_at IS NULL";

const JOURNALS: &str = "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])";

const ENTRIES: &str = "INSERT INTO entries (journal_id, account, currency, debit, credit)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])";

const OUTBOX: &str = "INSERT INTO outbox (merchant_id, payment_id, event_type, body)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::json[])";

/// Only while the key is still in flight and still holds the request's fence: a key taken over
/// by a newer request (its lease ran out while this one waited) is not ours to complete, and
/// the missing row in RETURNING fails the commit as `Fenced`.
const IDEMPOTENCY: &str = "UPDATE idempotency_keys k SET resource_id = coalesce(u.resource_id, k.resource_id),
        response_status = u.status, response_body = u.body
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::bytea[], $6::int8[])
        AS u(merchant_id, key, resource_id, status, body, fence)
    WHERE k.merchant_id = u.merchant_id AND k.key = u.key AND k.response_status IS NULL AND k.fence = u.fence
    RETURNING k.key";

/// A request's first commit claims its key ([`IdempotencyWrite::claim`]): the row, as a claim
/// would insert it, already naming what the commit creates. A key some row holds inserts
/// nothing, and the row missing from RETURNING fails the commit as `KeyHeld`. In key order (byte
/// order, as the group-committed claims sort theirs), so that two batches claiming the same keys
/// wait for each other in one order, never in a cycle.
const IDEMPOTENCY_CLAIM: &str = "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until, holder,
        resource_id, response_status, response_body)
    SELECT u.merchant_id, u.key, u.fingerprint, now() + make_interval(secs => u.lease), u.holder, u.resource_id,
        u.status, u.body
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::float8[], $5::text[], $6::text[], $7::int2[], $8::bytea[])
        AS u(merchant_id, key, fingerprint, lease, holder, resource_id, status, body)
    ORDER BY u.merchant_id COLLATE \"C\", u.key COLLATE \"C\"
    ON CONFLICT (merchant_id, key) DO NOTHING RETURNING key";

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

/// Cluster mode, first in a batch: each partition the batch writes must still be held under
/// the lease its commits carry. `FOR SHARE` holds the rows until the batch ends, so a node
/// taking a partition over (`Db::take_partition`) waits for the batch, and a batch after it
/// finds the new holder and fails as `Moved`.
pub const FENCE: &str = "SELECT f.partition FROM partition_fences f
    JOIN unnest($1::int4[], $2::int8[], $3::text[]) AS u(p, r, h)
      ON f.partition = u.p AND f.revision = u.r AND f.holder = u.h
    FOR SHARE OF f";

/// [`PLANNER`]'s text, for [`BEGIN`] to start with it too.
macro_rules! planner {
    () => {
        concat!(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; ",
            "SET LOCAL plan_cache_mode = force_generic_plan"
        )
    };
}

/// The planner's settings for a batch's transaction, sent first. Every statement of a batch
/// joins the batch's rows (`unnest`) with a table that only grows, and must cost what the batch
/// writes, never what the table holds: one index probe per row. After its first executions a
/// connection may settle on a generic plan of a prepared statement and keep it until the
/// table's statistics change; made while the tables were small (a new database, the first
/// minute after a deploy), an update's was a hash join over a sequential scan of the whole
/// table, and stayed so until the next ANALYZE. The same holds for the triggers' queries first
/// planned in a batch. docs/DESIGN.md, "Plans that stay cheap".
///
/// And the generic plan from the first execution on, never a plan made for the batch's own
/// arrays: for a statement that joins, PostgreSQL prices a custom plan (which knows the arrays'
/// lengths) below the generic one (which assumes a hundred rows per array) and so planned the
/// batch's updates afresh on every batch (measured with `pg_stat_statements`: as many plans as
/// executions, 60 to 190 µs each). The generic plans are the ones the plan test checks.
pub const PLANNER: &str = planner!();

/// A batch's transaction opens with its planner settings, in one message. Its answer is awaited
/// before any statement is sent: were BEGIN refused (a cancel landing on it), statements sent
/// behind it would each commit on their own (tokio-postgres ends every statement with its own
/// Sync). Pipelining it was tried and measured no faster (docs/BENCHMARKS.md, "2026-11-29
/// (later)"): keep the round trip.
const BEGIN: &str = concat!("BEGIN; ", planner!());

/// Every statement of a batch, named once: the prepared set a batch runs ([`Statements`]) and
/// the list the plan test reads ([`STATEMENTS`]) come from this one list, so none of them can
/// be run without its plan being checked. The cluster's partition fence, prepared apart (only
/// a batch with fences runs it), is added to the list by hand.
macro_rules! statements {
    ($($field:ident: $sql:ident),+ $(,)?) => {
        /// Every statement of a batch, prepared (cached per connection) and named.
        struct Statements {
            $($field: Statement),+
        }

        impl Statements {
            async fn prepare(tx: &deadpool_postgres::ClientWrapper) -> Result<Statements, StoreError> {
                let p = |sql: &'static str| async move { tx.prepare_cached(sql).await.map_err(pg_error) };
                Ok(Statements {
                    $($field: p($sql).await?),+
                })
            }
        }

        /// Every statement a batch may run, by name, for the test that reads their plans: the
        /// prepared set, and the partition fence a cluster's batch adds.
        pub const STATEMENTS: &[(&str, &str)] = &[$((stringify!($field), $sql)),+, ("fence", FENCE)];
    };
}

statements! {
    payments_insert: PAYMENTS_INSERT,
    payments_check: PAYMENTS_CHECK,
    payments_update: PAYMENTS_UPDATE,
    payments_state_update: PAYMENTS_STATE_UPDATE,
    refunds: REFUNDS,
    transitions: TRANSITIONS,
    attempts_start: ATTEMPTS_START,
    attempts_finish: ATTEMPTS_FINISH,
    journals: JOURNALS,
    entries: ENTRIES,
    outbox: OUTBOX,
    idempotency: IDEMPOTENCY,
    idempotency_claim: IDEMPOTENCY_CLAIM,
    balances: BALANCES,
    processed: PROCESSED,
    disputes: DISPUTES,
    exceptions: EXCEPTIONS,
}

/// A statement's column arrays: one named field per column, in the statement's `$n` order,
/// which `params` hands over.
macro_rules! columns {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Default)]
        struct $name {
            $($field: Vec<$ty>),+
        }

        impl $name {
            fn len(&self) -> usize {
                [$(self.$field.len()),+][0]
            }

            fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
                vec![$(&self.$field),+]
            }
        }
    };
}

columns!(RefundColumns {
    id: String,
    payment_id: String,
    merchant_id: String,
    amount: i64,
    currency: String,
    status: String,
    reason: Option<String>,
    psp_reference: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    reverse_splits: bool,
    refund_application_fee: bool,
});

columns!(StateColumns {
    id: String,
    version: i32,
    status: &'static str,
    capturable: i64,
    captured: i64,
    refunded: i64,
    refund_pending: i64,
    disputed: i64,
    settled: bool,
    transitions: i32,
    updated_at: DateTime<Utc>,
});

columns!(CheckColumns {
    id: String,
    version: i32,
});

columns!(TransitionColumns {
    payment_id: String,
    seq: i32,
    from_status: Option<String>,
    to_status: String,
    cause: String,
    at: DateTime<Utc>,
});

columns!(AttemptStartColumns {
    id: String,
    payment_id: String,
    operation: String,
    amount: Option<i64>,
    refund_id: Option<String>,
    idempotency_key: Option<String>,
    started_at: DateTime<Utc>,
    connector_id: Option<String>,
});

columns!(AttemptFinishColumns {
    id: String,
    outcome: String,
    finished_at: DateTime<Utc>,
    reference: Option<String>,
});

columns!(JournalColumns {
    id: String,
    payment_id: String,
    merchant_id: String,
    kind: String,
    correlation_id: String,
    currency: String,
    created_at: DateTime<Utc>,
});

columns!(EntryColumns {
    journal_id: String,
    account: String,
    currency: String,
    debit: i64,
    credit: i64,
});

columns!(OutboxColumns {
    merchant_id: String,
    payment_id: String,
    event_type: String,
    payload: Json<Box<RawValue>>,
});

columns!(IdempotencyColumns {
    merchant_id: String,
    key: String,
    resource_id: Option<String>,
    response_status: Option<i16>,
    response_body: Option<Vec<u8>>,
    fence: i64,
});

columns!(ClaimColumns {
    merchant_id: String,
    key: String,
    fingerprint: Vec<u8>,
    lease: f64,
    holder: Option<String>,
    resource_id: Option<String>,
    response_status: Option<i16>,
    response_body: Option<Vec<u8>>,
});

columns!(ExceptionColumns {
    payment_id: String,
    merchant_id: String,
    detail: String,
});

columns!(ProcessedColumns {
    provider: String,
    event_id: String,
    event_type: String,
    payment_id: Option<String>,
    raw: Vec<u8>,
});

columns!(DisputeColumns {
    id: String,
    payment_id: String,
    merchant_id: String,
    psp_reference: String,
    amount: i64,
    currency: String,
    status: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
});

/// The batch as column arrays, one set per statement.
#[derive(Default)]
pub struct Columns {
    ins: PaymentColumns,
    check: CheckColumns,
    upd: PaymentColumns,
    state: StateColumns,
    refunds: RefundColumns,
    transitions: TransitionColumns,
    starts: AttemptStartColumns,
    finishes: AttemptFinishColumns,
    journals: JournalColumns,
    entries: EntryColumns,
    outbox: OutboxColumns,
    idempotency: IdempotencyColumns,
    claims: ClaimColumns,
    exceptions: ExceptionColumns,
    processed: ProcessedColumns,
    disputes: DisputeColumns,
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
    customer: Vec<Option<Value>>,
    card: Vec<Option<Value>>,
    risk: Vec<Option<Value>>,
    splits: Vec<Option<Value>>,
    routing: Vec<Option<Value>>,
}

impl StateColumns {
    /// The columns a state-only update writes (`Commit::state_only`), nothing else.
    fn push(&mut self, p: &Payment) {
        let s = &p.state;
        self.id.push(p.id.to_string());
        self.version.push(p.version);
        self.status.push(s.status.as_str());
        self.capturable.push(s.capturable);
        self.captured.push(s.captured);
        self.refunded.push(s.refunded);
        self.refund_pending.push(s.refund_pending);
        self.disputed.push(s.disputed);
        self.settled.push(s.settled);
        self.transitions.push(p.transitions);
        self.updated_at.push(p.updated_at);
    }
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
        self.customer.push(json(p.customer.as_ref().map(serde_json::to_value))?);
        self.card.push(json(p.card.as_ref().map(serde_json::to_value))?);
        self.risk.push(json(p.risk.as_ref().map(serde_json::to_value))?);
        self.splits.push(json(p.splits.as_ref().map(serde_json::to_value))?);
        self.routing.push(json(p.routing.as_ref().map(serde_json::to_value))?);
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
            &self.customer,
            &self.card,
            &self.risk,
            &self.splits,
            &self.routing,
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
            &self.card,
            &self.risk,
            &self.splits,
            &self.psp,
            &self.routing,
        ]
    }
}

impl Columns {
    /// The batch as its statements bind it: one vector per column of each table it writes.
    /// Public for the hot-path benchmark (`benches/hot_path.rs`).
    pub fn of(batch: &[&Commit]) -> Result<Columns, StoreError> {
        let mut c = Columns::default();
        for commit in batch {
            let Some(p) = commit.payment.as_ref() else { continue };
            let at = p.updated_at;
            if commit.unchanged {
                c.check.id.push(p.id.to_string());
                c.check.version.push(p.version);
            } else if p.version == 1 {
                c.ins.push(p)?;
            } else if commit.state_only {
                c.state.push(p);
            } else {
                c.upd.push(p)?;
            }
            for r in &commit.refunds {
                let t = &mut c.refunds;
                t.id.push(r.id.to_string());
                t.payment_id.push(r.payment_id.to_string());
                t.merchant_id.push(r.merchant_id.to_string());
                t.amount.push(r.amount.minor);
                t.currency.push(r.amount.currency.code().to_owned());
                t.status.push(r.status.as_str().to_owned());
                t.reason.push(r.reason.clone());
                t.psp_reference.push(r.psp_reference.clone());
                t.created_at.push(r.created_at);
                t.updated_at.push(r.updated_at);
                t.reverse_splits.push(r.reverse_splits);
                t.refund_application_fee.push(r.refund_application_fee);
            }
            if let Some(tr) = &commit.transition {
                let t = &mut c.transitions;
                t.payment_id.push(p.id.to_string());
                t.seq.push(tr.seq);
                t.from_status.push(tr.from.map(|s| s.as_str().to_owned()));
                t.to_status.push(tr.to.as_str().to_owned());
                t.cause.push(tr.cause.clone());
                t.at.push(at);
            }
            if let Some(a) = &commit.attempt_started {
                let (operation, amount) = a.operation();
                let t = &mut c.starts;
                t.id.push(a.id.to_string());
                t.payment_id.push(p.id.to_string());
                t.operation.push(operation.to_owned());
                t.amount.push(amount);
                t.refund_id.push(a.refund_id.as_ref().map(|r| r.to_string()));
                t.idempotency_key.push(a.idem_key.clone());
                t.started_at.push(at);
                t.connector_id.push(a.connector_id.clone());
            }
            if let Some((id, outcome)) = &commit.attempt_finished {
                let t = &mut c.finishes;
                t.id.push(id.to_string());
                t.outcome.push(outcome.as_str().to_owned());
                t.finished_at.push(at);
                t.reference.push(commit.attempt_reference.clone());
            }
            if let Some(j) = &commit.journal {
                // Invariant 2, asserted in code before the database checks it again at commit.
                if !ledger::is_balanced(&j.entries) {
                    tracing::error!(payment_id = %p.id, kind = j.kind.as_str(), "refusing an unbalanced journal");
                    return Err(StoreError::Broken);
                }
                let id = JournalId::generate().to_string();
                for e in &j.entries {
                    let t = &mut c.entries;
                    t.journal_id.push(id.clone());
                    t.account.push(e.account.clone());
                    t.currency.push(j.currency.code().to_owned());
                    t.debit.push(e.debit);
                    t.credit.push(e.credit);
                }
                let t = &mut c.journals;
                t.id.push(id);
                t.payment_id.push(p.id.to_string());
                t.merchant_id.push(p.merchant_id.to_string());
                t.kind.push(j.kind.as_str().to_owned());
                t.correlation_id.push(j.correlation_id.clone());
                t.currency.push(j.currency.code().to_owned());
                t.created_at.push(at);
            }
            for e in &commit.outbox {
                let t = &mut c.outbox;
                t.merchant_id.push(p.merchant_id.to_string());
                t.payment_id.push(p.id.to_string());
                t.event_type.push(e.event_type.clone());
                t.payload.push(Json(e.payload.clone()));
            }
            if let Some(e) = &commit.processed_event {
                let t = &mut c.processed;
                t.provider.push(e.provider.clone());
                t.event_id.push(e.event_id.clone());
                t.event_type.push(e.event_type.clone());
                t.payment_id.push(Some(p.id.to_string()));
                t.raw.push(e.raw.clone());
            }
            for d in &commit.disputes {
                let t = &mut c.disputes;
                t.id.push(d.id.to_string());
                t.payment_id.push(d.payment_id.to_string());
                t.merchant_id.push(d.merchant_id.to_string());
                t.psp_reference.push(d.psp_reference.clone());
                t.amount.push(d.amount.minor);
                t.currency.push(d.amount.currency.code().to_owned());
                t.status.push(d.status.as_str().to_owned());
                t.reason.push(d.reason.clone());
                t.created_at.push(d.created_at);
                t.updated_at.push(d.updated_at);
            }
            if let Some((i, claim)) = commit.idempotency.as_ref().and_then(|i| Some((i, i.claim.as_ref()?))) {
                let t = &mut c.claims;
                t.merchant_id.push(i.merchant_id.to_string());
                t.key.push(i.key.clone());
                t.fingerprint.push(claim.fingerprint.clone());
                t.lease.push(claim.lease_ms as f64 / 1000.0);
                t.holder.push(claim.holder.clone());
                t.resource_id.push(i.resource_id.clone());
                t.response_status.push(i.response.as_ref().map(|(s, _)| *s as i16));
                t.response_body.push(i.response.as_ref().map(|(_, b)| b.clone()));
            } else if let Some(i) = &commit.idempotency {
                let t = &mut c.idempotency;
                t.merchant_id.push(i.merchant_id.to_string());
                t.key.push(i.key.clone());
                t.resource_id.push(i.resource_id.clone());
                t.response_status.push(i.response.as_ref().map(|(s, _)| *s as i16));
                t.response_body.push(i.response.as_ref().map(|(_, b)| b.clone()));
                t.fence.push(i.fence);
            }
            for (payment, detail) in &commit.exceptions {
                let t = &mut c.exceptions;
                t.payment_id.push(payment.to_string());
                t.merchant_id.push(p.merchant_id.to_string());
                t.detail.push(detail.clone());
            }
        }
        Ok(c)
    }
}

/// The distinct leases a batch's commits carry, as [`FENCE`]'s column arrays.
#[derive(Default)]
struct Fences {
    partitions: Vec<i32>,
    revisions: Vec<i64>,
    holders: Vec<String>,
}

impl Fences {
    fn of(batch: &[&Commit]) -> Fences {
        let mut f = Fences::default();
        for t in batch.iter().filter_map(|c| c.lease.as_ref()) {
            let seen = f
                .partitions
                .iter()
                .zip(&f.revisions)
                .zip(&f.holders)
                .any(|((p, r), h)| *p == t.partition && *r == t.revision && h.as_str() == &*t.holder);
            if !seen {
                f.partitions.push(t.partition);
                f.revisions.push(t.revision);
                f.holders.push(t.holder.to_string());
            }
        }
        f
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![&self.partitions, &self.revisions, &self.holders]
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
        let (accounts, currencies, debits, credits) = balance_columns(&deltas);
        let mut open = Open::new(self.client().await?);
        let client = open.client();
        // Prepared first (cached per connection), so the executes below go out strictly in order.
        let st = Statements::prepare(client).await?;
        let fences = Fences::of(batch);
        let fence_statement = match fences.partitions.is_empty() {
            true => None,
            false => Some(client.prepare_cached(FENCE).await.map_err(pg_error)?),
        };
        let tx: &tokio_postgres::Client = client;
        // From here until COMMIT or ROLLBACK is answered, the guard closes the connection if
        // this future is dropped.
        tx.batch_execute(BEGIN).await.map_err(pg_error)?;
        // Everything below goes out in one stream, the balances last, and is read back in
        // order: one round trip between BEGIN and COMMIT, not one per step.
        let mut pending: Vec<Pending<'_>> = Vec::with_capacity(18);
        // First, so that the lease rows are held before anything is written.
        let lease_check = match &fence_statement {
            Some(statement) => queue(
                &mut pending,
                tx,
                statement,
                true,
                fences.partitions.len(),
                fences.params(),
            ),
            None => None,
        };
        // Then the keys this batch claims: a key held already fails the batch before anything
        // else could (a payment's row, say).
        let claim_check = queue(
            &mut pending,
            tx,
            &st.idempotency_claim,
            true,
            cols.claims.len(),
            cols.claims.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.payments_insert,
            false,
            cols.ins.id.len(),
            cols.ins.insert_params(),
        );
        let unchanged_check = queue(
            &mut pending,
            tx,
            &st.payments_check,
            true,
            cols.check.len(),
            cols.check.params(),
        );
        let stale_check = queue(
            &mut pending,
            tx,
            &st.payments_update,
            true,
            cols.upd.id.len(),
            cols.upd.update_params(),
        );
        let state_check = queue(
            &mut pending,
            tx,
            &st.payments_state_update,
            true,
            cols.state.len(),
            cols.state.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.refunds,
            false,
            cols.refunds.len(),
            cols.refunds.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.transitions,
            false,
            cols.transitions.len(),
            cols.transitions.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.attempts_start,
            false,
            cols.starts.len(),
            cols.starts.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.attempts_finish,
            false,
            cols.finishes.len(),
            cols.finishes.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.journals,
            false,
            cols.journals.len(),
            cols.journals.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.entries,
            false,
            cols.entries.len(),
            cols.entries.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.outbox,
            false,
            cols.outbox.len(),
            cols.outbox.params(),
        );
        let fence_check = queue(
            &mut pending,
            tx,
            &st.idempotency,
            true,
            cols.idempotency.len(),
            cols.idempotency.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.exceptions,
            false,
            cols.exceptions.len(),
            cols.exceptions.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.processed,
            false,
            cols.processed.len(),
            cols.processed.params(),
        );
        queue(
            &mut pending,
            tx,
            &st.disputes,
            false,
            cols.disputes.len(),
            cols.disputes.params(),
        );
        // Last, so the shard's balance rows are locked for the shortest time. Run even if a
        // statement before it failed (the transaction is then rolled back whole).
        if !deltas.is_empty() {
            let params: Vec<&(dyn ToSql + Sync)> = vec![&slot, &accounts, &currencies, &debits, &credits];
            pending.push(job(tx, &st.balances, false, params));
        }
        // One connection runs them in the order they were sent.
        let results = futures_util::future::join_all(pending).await;
        let checks = Checks {
            lease: lease_check,
            unchanged: unchanged_check,
            stale: stale_check,
            state: state_check,
            fence: fence_check,
            claim: claim_check,
        };
        match verdict(results, &checks, &fences, &cols) {
            Ok(()) => open.commit().await.map_err(|e| {
                if refused_at_commit(e.code()) {
                    CommitError::Store(pg_error(e))
                } else {
                    CommitError::Unknown
                }
            })?,
            Err(e) => {
                open.roll_back().await;
                return Err(e);
            }
        }
        if batch.iter().any(|c| !c.outbox.is_empty()) {
            self.outbox_committed();
        }
        Ok(())
    }
}

/// Whether an error answering a COMMIT says the transaction was rolled back: a refusal of the
/// COMMIT itself (a deferred check, class 23; a serialization failure or deadlock, class 40).
/// Anything else (no answer at all; the backend terminated or shut down, which may come after
/// the commit was flushed locally) leaves its fate unknown.
fn refused_at_commit(code: Option<&tokio_postgres::error::SqlState>) -> bool {
    code.is_some_and(|c| c.code().starts_with("23") || c.code().starts_with("40"))
}

/// Where a batch's counted statements are in its results.
struct Checks {
    lease: Option<usize>,
    unchanged: Option<usize>,
    stale: Option<usize>,
    state: Option<usize>,
    fence: Option<usize>,
    claim: Option<usize>,
}

/// What a batch's results say: a partition that moved, a lost race, a key taken over, a
/// failed statement, or success.
fn verdict(
    results: Vec<Result<Option<u64>, tokio_postgres::Error>>,
    checks: &Checks,
    fences: &Fences,
    cols: &Columns,
) -> Result<(), CommitError> {
    // A payment update that matched fewer rows than asked means a payment moved on: that
    // explains any error after it (a duplicate audit-trail seq, say), so it wins. Then a key
    // that was taken over.
    let count = |at: Option<usize>| at.and_then(|k| results[k].as_ref().ok().copied().flatten());
    // A partition that moved explains everything else: another node's actor owns it now.
    if matches!(count(checks.lease), Some(n) if n as usize != fences.partitions.len()) {
        return Err(CommitError::Moved);
    }
    if matches!(count(checks.unchanged), Some(n) if n as usize != cols.check.len())
        || matches!(count(checks.stale), Some(n) if n as usize != cols.upd.id.len())
        || matches!(count(checks.state), Some(n) if n as usize != cols.state.len())
    {
        return Err(CommitError::Stale);
    }
    if matches!(count(checks.fence), Some(n) if n as usize != cols.idempotency.len()) {
        return Err(CommitError::Fenced);
    }
    if matches!(count(checks.claim), Some(n) if n as usize != cols.claims.len()) {
        return Err(CommitError::KeyHeld);
    }
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(pg_error(e).into()),
        None => Ok(()),
    }
}

/// A batch's connection while its transaction may be open. Dropped before its COMMIT or
/// ROLLBACK was answered (the batch's future dropped mid-flight, a connection error), it takes
/// the connection out of the pool and closes it: PostgreSQL rolls the transaction back, and no
/// other caller is ever handed a connection inside it.
pub(super) struct Open {
    client: Option<deadpool_postgres::Object>,
}

impl Open {
    pub(super) fn new(client: deadpool_postgres::Object) -> Open {
        Open { client: Some(client) }
    }

    pub(super) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.client.as_ref().expect("a batch's connection until it ends")
    }

    /// COMMIT. A refusal by the server (a deferred check) ends the transaction too; only a
    /// connection that did not answer is closed.
    async fn commit(&mut self) -> Result<(), tokio_postgres::Error> {
        let answer = self.client().batch_execute("COMMIT").await;
        self.ended(&answer);
        answer
    }

    /// The answer to a COMMIT sent by the caller: the transaction is over if the server
    /// answered, and the connection goes back to the pool.
    pub(super) fn ended(&mut self, answer: &Result<(), tokio_postgres::Error>) {
        if answer.as_ref().map_or_else(|e| e.code().is_some(), |()| true) {
            self.client.take();
        }
    }

    async fn roll_back(&mut self) {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.client.take();
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The balances' columns: one row per (account, currency) of the batch's deltas.
fn balance_columns(deltas: &Deltas) -> (Vec<&str>, Vec<&str>, Vec<i64>, Vec<i64>) {
    (
        deltas.keys().map(|(a, _)| a.as_str()).collect(),
        deltas.keys().map(|(_, c)| c.as_str()).collect(),
        deltas.values().map(|d| d.0).collect(),
        deltas.values().map(|d| d.1).collect(),
    )
}

/// Queues `statement` if it has rows to write; its place in the queue, to read its count.
fn queue<'a>(
    pending: &mut Vec<Pending<'a>>,
    tx: &'a tokio_postgres::Client,
    statement: &'a Statement,
    counted: bool,
    len: usize,
    params: Vec<&'a (dyn ToSql + Sync)>,
) -> Option<usize> {
    (len > 0).then(|| {
        pending.push(job(tx, statement, counted, params));
        pending.len() - 1
    })
}

/// One statement of a batch, to be run in order with the others. `counted`: its rows are
/// returned and counted (the payment update's lost-race check).
fn job<'a>(
    tx: &'a tokio_postgres::Client,
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

#[cfg(test)]
mod tests {
    use super::refused_at_commit;
    use tokio_postgres::error::SqlState;

    #[test]
    fn a_commit_is_taken_as_rolled_back_only_when_the_server_refused_it() {
        for refused in [
            SqlState::CHECK_VIOLATION,
            SqlState::FOREIGN_KEY_VIOLATION,
            SqlState::UNIQUE_VIOLATION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ] {
            assert!(refused_at_commit(Some(&refused)), "{}", refused.code());
        }
        // No answer, or the backend went away: the COMMIT may have been flushed first.
        assert!(!refused_at_commit(None));
        for unknown in [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::IO_ERROR] {
            assert!(!refused_at_commit(Some(&unknown)), "{}", unknown.code());
        }
    }
}
