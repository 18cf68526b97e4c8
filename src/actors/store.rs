//! What the payment flow needs from the world, as small traits: the store it loads from and
//! commits to, and the clock and id source. Production implements them with PostgreSQL, the
//! ledger shards and the system clock ([`PgStore`], [`SystemClock`]); the deterministic
//! simulation (`tests/simulation.rs`) implements them in memory with injected faults, so the
//! very same flow code runs under a seeded scheduler (docs/RELIABILITY.md, "Simulation").

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::ledger_shard::Ledger;
use super::payment_flow::Live;
use crate::adapters::postgres::commit::{AttemptOutcome, Commit, CommitError};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::postgres::Db;
use crate::adapters::postgres::StoreError;
use crate::domain::{Dispute, PaymentId, Refund, RefundId};

/// A store call. Not `Send`: the flow runs inside one actor, on one thread.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + 'a>>;
pub type CommitFuture<'a> = Pin<Box<dyn Future<Output = Result<(), CommitError>> + 'a>>;

/// The payment flow's storage. Every write is a [`Commit`]: all of it lands, or none of it.
/// [`CommitError::Store`] and [`CommitError::Unknown`] are ambiguous: the transaction may have
/// committed although its answer was lost. The others say nothing was written.
pub trait PaymentStore: Send + Sync + 'static {
    /// A payment with its PSP attempts that have no outcome yet.
    fn load<'a>(&'a self, id: &'a PaymentId) -> StoreFuture<'a, Option<Live>>;
    fn commit(&self, commit: Commit) -> CommitFuture<'_>;
    /// One refund of a payment.
    fn refund<'a>(&'a self, payment: &'a PaymentId, id: &'a RefundId) -> StoreFuture<'a, Option<Refund>>;
    /// The payment's refunds that carry one of these PSP references.
    fn refunds_by_reference<'a>(
        &'a self,
        payment: &'a PaymentId,
        references: &'a [String],
    ) -> StoreFuture<'a, Vec<Refund>>;
    /// The PSP attempt a request with this idempotency key started on the payment, with its
    /// outcome if it has one.
    fn attempt_by_key<'a>(
        &'a self,
        payment: &'a PaymentId,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Attempt, Option<AttemptOutcome>)>>;
    fn event_processed<'a>(&'a self, provider: &'a str, event_id: &'a str) -> StoreFuture<'a, bool>;
    /// The payment's dispute with this PSP reference.
    fn dispute<'a>(&'a self, payment: &'a PaymentId, reference: &'a str) -> StoreFuture<'a, Option<Dispute>>;
}

/// Time and fresh ids, so that a simulation can make both deterministic.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// A fresh id body (after the prefix): unique, 1 to 64 ASCII letters or digits.
    fn unique(&self) -> String;
}

/// The system clock and UUIDv7 ids.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        crate::domain::record::now()
    }

    fn unique(&self) -> String {
        uuid::Uuid::now_v7().simple().to_string()
    }
}

/// PostgreSQL for reads, the ledger shards' group commit for writes.
pub struct PgStore {
    pub db: Db,
    pub ledger: Arc<Ledger>,
    /// Cluster mode: every commit carries its partition's lease, and a payment whose partition
    /// this node does not own is not written at all.
    pub leases: Option<Arc<crate::adapters::cluster::Leases>>,
}

impl PaymentStore for PgStore {
    fn load<'a>(&'a self, id: &'a PaymentId) -> StoreFuture<'a, Option<Live>> {
        Box::pin(async move {
            Ok(self
                .db
                .load_payment(id)
                .await?
                .map(|(payment, open)| Live { payment, open }))
        })
    }

    fn commit(&self, mut commit: Commit) -> CommitFuture<'_> {
        if let (Some(leases), Some(payment)) = (&self.leases, &commit.payment) {
            match leases.token(payment.id.as_str()) {
                Some(token) => commit.lease = Some(token),
                None => return Box::pin(std::future::ready(Err(CommitError::Moved))),
            }
        }
        Box::pin(self.ledger.commit(commit))
    }

    fn refund<'a>(&'a self, payment: &'a PaymentId, id: &'a RefundId) -> StoreFuture<'a, Option<Refund>> {
        Box::pin(self.db.refund_of_payment(payment, id))
    }

    fn refunds_by_reference<'a>(
        &'a self,
        payment: &'a PaymentId,
        references: &'a [String],
    ) -> StoreFuture<'a, Vec<Refund>> {
        Box::pin(self.db.refunds_by_reference(payment, references))
    }

    fn attempt_by_key<'a>(
        &'a self,
        payment: &'a PaymentId,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Attempt, Option<AttemptOutcome>)>> {
        Box::pin(self.db.attempt_by_key(payment, key))
    }

    fn event_processed<'a>(&'a self, provider: &'a str, event_id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.db.event_processed(provider, event_id))
    }

    fn dispute<'a>(&'a self, payment: &'a PaymentId, reference: &'a str) -> StoreFuture<'a, Option<Dispute>> {
        Box::pin(self.db.dispute_of_payment(payment, reference))
    }
}
