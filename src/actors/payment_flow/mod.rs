//! What a payment actor does with one message, as plain async code over owned state. The
//! actor runs it atomically (no other message starts until it ends), so nothing here needs a
//! lock. It follows docs/DESIGN.md, "Calling the PSP safely": decide (pure), record the
//! attempt, call the PSP with a timeout, commit the outcome with its journal, outbox row and
//! idempotency record in one transaction, reply.
//!
//! - this file: the message's life (`process`), resuming by key, and the commit;
//! - `commands`: the merchant's operations (create, confirm, capture, cancel, refund, sync);
//! - `attempts`: PSP attempts, from the call to the committed outcome, and their recovery;
//! - `events`: PSP events, as the facts `adapters::psp::events` makes of them.
//!
//! It touches the world only through [`PaymentDeps`]: a store, a PSP and a clock, which the
//! deterministic simulation (`tests/simulation`) replaces.

mod attempts;
mod commands;
mod events;

use std::time::Duration;

use super::error::PaymentError;
use super::payment::{IdemKey, Op, Reply};
use super::store::{Clock, PaymentStore};
use crate::adapters::nats::PspEvent;
use crate::adapters::postgres::commit::{
    AttemptOutcome, Commit, CommitError, IdempotencyWrite, OutboxEvent, ProcessedEvent, Transition,
};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::postgres::StoreError;
use crate::adapters::psp::Psp;
use crate::domain::{AttemptId, Dispute, Money, Payment, RefundId, Status};

/// The status of the answer to a PSP event that was already applied (HTTP's "Already
/// Reported"): the consumer acknowledges it as a duplicate. Events never reach an HTTP client.
pub const DUPLICATE_EVENT: u16 = 208;

/// What a payment actor needs from the world.
pub struct PaymentDeps {
    /// Reads, and every commit (in production: the ledger shards' group commit).
    pub store: std::sync::Arc<dyn PaymentStore>,
    /// The tokenizer asked for card facts (risk rules, routing): the embedded sandbox's vault.
    pub psp: std::sync::Arc<dyn Psp>,
    /// Where PSP calls go: routing for a new authorization, then the connector that authorized.
    pub connectors: std::sync::Arc<dyn crate::adapters::psp::connector::Connectors>,
    /// How long a PSP call may take before its outcome counts as unknown; `None` leaves it to
    /// the PSP (the simulation's PSP decides itself when, and whether, it answers).
    pub psp_timeout: Option<Duration>,
    pub clock: std::sync::Arc<dyn Clock>,
    /// The merchant's risk rules, asked before every authorization.
    pub risk: std::sync::Arc<dyn super::risk::RiskCheck>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// PSP references whose first commit is under way, for the event consumer.
    pub landing: std::sync::Arc<super::landing::Landing>,
}

/// A live payment: its committed state and the PSP attempts still without an outcome.
#[derive(Debug, Clone)]
pub struct Live {
    pub payment: Payment,
    pub open: Vec<Attempt>,
}

/// Why processing stopped early: an answer for the caller, and whether the actor's state can
/// no longer be trusted, so that it must reload from the store: a lost write race, or a commit
/// whose fate is unknown (it may have landed although it reported failure).
struct Halt {
    error: PaymentError,
    stale: bool,
}

impl From<PaymentError> for Halt {
    fn from(error: PaymentError) -> Halt {
        Halt { error, stale: false }
    }
}

/// A read that failed: nothing was written, memory is still the truth.
impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Halt {
        Halt {
            error: e.into(),
            stale: false,
        }
    }
}

impl From<CommitError> for Halt {
    fn from(e: CommitError) -> Halt {
        match e {
            CommitError::Stale => Halt {
                error: PaymentError::Unavailable("payment state"),
                stale: true,
            },
            CommitError::Fenced => Halt {
                error: PaymentError::KeyTakenOver,
                stale: false,
            },
            // Nothing of this commit was written, but an earlier run of it may have been (a
            // create that had landed and is written again finds its own key). `process` looks
            // for the payment.
            CommitError::KeyHeld => Halt {
                error: PaymentError::KeyHeld,
                stale: true,
            },
            // Another node owns the payment now: this actor's memory is not to be trusted.
            CommitError::Moved => Halt {
                error: PaymentError::Unavailable(crate::actors::forward::MOVED),
                stale: true,
            },
            // The ledger never took it: nothing was written.
            CommitError::Unavailable(what) => Halt {
                error: PaymentError::Unavailable(what),
                stale: false,
            },
            // Ambiguous: the transaction may have committed. Memory is no longer the truth.
            CommitError::Unknown => Halt {
                error: crate::adapters::postgres::StoreError::Unavailable.into(),
                stale: true,
            },
            CommitError::Store(e) => Halt {
                error: e.into(),
                stale: true,
            },
        }
    }
}

/// The commit that marks `payment`'s capture settled (reconciliation matched it), or `None`
/// when there is nothing to change. Used by the payment's actor, and by a reconciliation run
/// for a payment with no live actor: the commit is fenced by the payment's version, so an
/// actor that activates meanwhile cannot be overwritten (one of the two commits is refused as
/// stale, and the run then goes through the actor).
pub fn settle_commit(payment: &Payment, now: chrono::DateTime<chrono::Utc>) -> Option<(Payment, Commit)> {
    let (state, _) = crate::domain::decide(&payment.state, crate::domain::Input::Settled).ok()?;
    if state == payment.state {
        return None;
    }
    let mut next = payment.clone();
    next.state = state;
    next.version += 1;
    next.updated_at = now;
    let mut commit = Commit {
        state_only: true,
        ..Commit::default()
    };
    if payment.status() != next.status() {
        commit.transition = Some(Transition {
            seq: payment.transitions,
            from: Some(payment.status()),
            to: next.status(),
            cause: "reconciliation.settled".to_owned(),
        });
        commit.outbox.push(OutboxEvent::new(
            format!("payment.{}", next.status().as_str()),
            &next.object(),
        ));
    }
    Some((next, commit))
}

/// [`settle_commit`] made ready to store without an actor (which would count the transition
/// and attach the payment itself in [`Flow::commit`]).
pub fn settle_commit_standalone(payment: &Payment, now: chrono::DateTime<chrono::Utc>) -> Option<Commit> {
    let (mut next, mut commit) = settle_commit(payment, now)?;
    if commit.transition.is_some() {
        next.transitions += 1;
    }
    commit.payment = Some(next);
    Some(commit)
}

/// Processes one call; returns the answer, the state as committed, and whether the state is stale.
pub async fn process(
    deps: &PaymentDeps,
    live: Live,
    op: Op,
    idem: Option<IdemKey>,
) -> (Result<Reply, PaymentError>, Live, bool) {
    let id = live.payment.id.clone();
    // A request that took its key over from an earlier one (fence > 1) may find that request's
    // work done or under way: it resumes it by key rather than repeating it.
    let by_key = idem.as_ref().map(|i| i.fence > 1).unwrap_or(false);
    let mut flow = Flow {
        deps,
        live,
        idem,
        event: None,
        dispute: None,
        by_key,
        fenced: false,
        fresh: matches!(op, Op::Create { .. }),
        fallbacks: Vec::new(),
        unsent: None,
        soft_retried: false,
        approved_here: false,
    };
    let mut result = if matches!(op, Op::Resolve) {
        // The sweeper found an attempt open in the store: memory may not know it (an ambiguous
        // commit), so start from the store.
        Err(Halt {
            error: PaymentError::Unavailable("payment state"),
            stale: true,
        })
    } else {
        flow.execute(op.clone()).await
    };
    if matches!(result, Err(Halt { stale: true, .. })) {
        // Another writer moved the payment on, or a commit's fate is unknown. Reload and resume
        // by key: an attempt this request started is completed, a finished one answered, and
        // only a request that left nothing behind runs again (never a second PSP effect).
        match deps.store.load(&id).await {
            Ok(Some(live)) => {
                tracing::info!(payment_id = %id, "reloaded from the store");
                // A payment being created whose first commit claimed its key: the payment is
                // stored, so that commit landed, and the key's row with it.
                if let Some(i) = flow.idem.as_mut() {
                    i.claim = None;
                }
                flow.live = live;
                flow.by_key = true;
                flow.fresh = false;
                // Whatever the first run sent may have reached a PSP: no failover from here.
                flow.unsent = None;
                flow.fallbacks.clear();
                // The commit that failed may have recorded the event: look again.
                let op = match op {
                    Op::PspEvent(e) if e.unrecorded => Op::PspEvent(std::sync::Arc::new(PspEvent {
                        unrecorded: false,
                        ..(*e).clone()
                    })),
                    op => op,
                };
                result = flow.execute(op).await;
            }
            // A payment being created that is not stored: its first commit did not land (its key
            // was held, the partition moved, the commit failed). The commit's own error stands,
            // never a 404 that a retry would replay instead of creating it.
            Ok(None) if flow.fresh => {}
            Ok(None) => result = Err(PaymentError::NotFound("payment").into()),
            Err(e) => {
                result = Err(Halt {
                    error: e.into(),
                    stale: true,
                })
            }
        }
    }
    if flow.fenced && result.is_ok() {
        // A newer request with the same key took it over while this one ran: what this one did
        // is committed, and the newer request answers for the key.
        result = Err(PaymentError::KeyTakenOver.into());
    }
    let status = flow.live.payment.status().as_str();
    match &result {
        Ok(reply) => tracing::debug!(reply = reply.status, status, "payment message handled"),
        Err(h) => tracing::debug!(error = %h.error, status, "payment message refused"),
    }
    match result {
        Ok(reply) => (Ok(reply), flow.live, false),
        // A payment whose creation did not commit must not stay in memory as if it existed.
        Err(h) => (Err(h.error), flow.live, h.stale || flow.fresh),
    }
}

struct Flow<'a> {
    deps: &'a PaymentDeps,
    live: Live,
    idem: Option<IdemKey>,
    /// The PSP event being applied: its dedupe row rides on the next commit.
    event: Option<ProcessedEvent>,
    /// A dispute the next commit opens or closes; its id correlates the journal.
    dispute: Option<Dispute>,
    /// Look for the PSP attempt this request's key already started before doing anything.
    by_key: bool,
    /// The key was taken over by a newer request during this one.
    fenced: bool,
    /// `live` is a payment its creator handed over, not stored yet.
    fresh: bool,
    /// Connectors this message's authorization may fail over to, in order (docs/DESIGN.md,
    /// "Routing and failover").
    fallbacks: Vec<String>,
    /// The authorization attempt this message started and has not sent yet: only its first
    /// call can prove that nothing reached the PSP. An attempt sent before (a retry, a
    /// recovery) is never failed over.
    unsent: Option<AttemptId>,
    /// A soft decline was already retried on another connector.
    soft_retried: bool,
    /// This message's approval commit landed, or went unanswered (it may have): after a reload,
    /// an authorized payment is its approval's, and the capture it promised goes on.
    approved_here: bool,
}

impl<'a> Flow<'a> {
    pub(super) fn payment(&self) -> &Payment {
        &self.live.payment
    }

    pub(super) fn idem_key(&self) -> Option<String> {
        self.idem.as_ref().map(|i| i.key.clone())
    }

    pub(super) async fn execute(&mut self, op: Op) -> Result<Reply, Halt> {
        // What the key's earlier request started, looked up once: an attempt memory may not hold
        // (it is resolved below as this request's own), or one that already ended.
        let earlier = match (self.by_key, self.idem_key()) {
            (true, Some(key)) => self.deps.store.attempt_by_key(&self.payment().id, &key).await?,
            _ => None,
        };
        if let Some((attempt, None)) = &earlier {
            if !self.live.open.iter().any(|a| a.id == attempt.id) {
                self.live.open.push(attempt.clone());
            }
        }
        // A retry of a request whose PSP call was left open is answered by that call's outcome.
        if let Some(reply) = self.resolve_open_attempts(op.reply_status()).await? {
            return Ok(reply);
        }
        match earlier {
            // The key's authorization reached no connector (every one was down): nothing was
            // done, so the request runs again and is routed again.
            Some((_, Some(AttemptOutcome::Unreachable))) => {}
            Some((attempt, Some(outcome))) => {
                // The key's work is done: answer with what it did, never do it again.
                return self.answer_finished(&attempt, outcome, op.reply_status()).await;
            }
            _ => {}
        }
        self.run(op).await
    }

    pub(super) async fn run(&mut self, op: Op) -> Result<Reply, Halt> {
        match op {
            Op::Create { confirm } => self.create(confirm).await,
            Op::Approve => self.approve().await,
            Op::Reject => self.reject().await,
            Op::Confirm {
                payment_method,
                created,
            } => self.confirm(payment_method, created).await,
            Op::Capture { amount } => self.capture(amount).await,
            Op::Cancel => self.cancel().await,
            Op::Refund {
                amount,
                reason,
                resume,
                share,
            } => self.refund(amount, reason, resume, share).await,
            Op::Sync => self.sync().await,
            Op::Resolve => Ok(self.payment_reply(200)),
            Op::PspEvent(e) => self.psp_event(&e).await,
            Op::Settle => self.settle().await,
        }
    }

    /// Marks the capture settled, once: a payment already settled, or one with nothing
    /// captured, is answered as it stands.
    async fn settle(&mut self) -> Result<Reply, Halt> {
        let now = self.deps.clock.now();
        if let Some((next, commit)) = settle_commit(self.payment(), now) {
            self.commit(next, commit).await?;
        }
        Ok(self.payment_reply(200))
    }

    /// A commit with the transition (if the status moved), its outbox event, and the idempotency
    /// record completed with `response`.
    pub(super) fn transition_commit(
        &self,
        before: &Payment,
        next: &Payment,
        cause: &str,
        response: Option<(u16, Vec<u8>)>,
    ) -> Commit {
        self.transition_commit_with(before, next, cause, response, None)
    }

    /// [`Flow::transition_commit`], given `next` as its event carries it (`next.object()`)
    /// when the caller has serialized it already.
    pub(super) fn transition_commit_with(
        &self,
        before: &Payment,
        next: &Payment,
        cause: &str,
        response: Option<(u16, Vec<u8>)>,
        object: Option<Box<serde_json::value::RawValue>>,
    ) -> Commit {
        let mut commit = Commit::default();
        if before.status() != next.status() {
            commit.transition = Some(Transition {
                seq: before.transitions,
                from: Some(before.status()),
                to: next.status(),
                cause: cause.to_owned(),
            });
            let event_type = format!("payment.{}", next.status().as_str());
            commit.outbox.push(match object {
                Some(payload) => OutboxEvent { event_type, payload },
                None => OutboxEvent::new(event_type, &next.object()),
            });
        }
        commit.idempotency = self.idem.as_ref().map(|i| IdempotencyWrite {
            merchant_id: i.merchant.clone(),
            key: i.key.clone(),
            resource_id: None,
            response: response.clone(),
            fence: i.fence,
            claim: i.claim.clone(),
        });
        commit
    }

    /// The payment as the next commit will leave it: one version on, `transitions` counted
    /// by [`Flow::commit`].
    pub(super) fn next_version(&self) -> Payment {
        let mut next = self.live.payment.clone();
        next.version += 1;
        next.updated_at = self.deps.clock.now();
        next
    }

    pub(super) async fn commit(&mut self, mut next: Payment, mut commit: Commit) -> Result<(), Halt> {
        if commit.transition.is_some() {
            next.transitions += 1;
        }
        if commit.processed_event.is_none() {
            commit.processed_event = self.event.take();
        }
        // A commit that leaves the payment as it is (its version too: see `Flow::apply`) writes
        // none of it, but is still fenced by the version. One that moves only the payment's
        // state (a capture by event, a settlement) writes only the state columns.
        if next.version > 1 && next.version == self.live.payment.version {
            // A change made without a new version would be dropped without a word: refuse it.
            if next != self.live.payment {
                tracing::error!(payment_id = %next.id, "a changed payment kept its version; refusing the commit");
                return Err(PaymentError::Store(crate::adapters::postgres::StoreError::Broken).into());
            }
            commit.unchanged = true;
        } else if next.version > 1 && !commit.state_only && self.live.payment.differs_only_in_state(&next) {
            commit.state_only = true;
        }
        commit.payment = Some(next.clone());
        let moved = commit
            .transition
            .as_ref()
            .map(|t| (t.from.map(Status::as_str).unwrap_or("none"), t.to.as_str()));
        // What this commit records of the outside world (a PSP answer, a PSP event) must land
        // even if the key was taken over; a commit that would only start something must not.
        // Only a commit that writes a key can find it taken over: no copy for the others (a PSP
        // event's, one per payment, carries the event's raw body).
        let records_a_fact = commit.attempt_finished.is_some() || commit.processed_event.is_some();
        let retry = (records_a_fact && commit.idempotency.is_some()).then(|| Commit {
            idempotency: None,
            ..commit.clone()
        });
        // A PSP reference stored for the first time: its events may already be waiting.
        let _landing = match (&next.psp_reference, &self.live.payment.psp_reference) {
            (Some(r), None) => self.deps.landing.begin(r),
            _ => None,
        };
        let kind = if commit.processed_event.is_some() {
            "psp_event"
        } else if commit.attempt_finished.is_some() {
            "psp_answer"
        } else if commit.attempt_started.is_some() {
            "attempt_start"
        } else {
            "other"
        };
        let asked = std::time::Instant::now();
        let committed = self.deps.store.commit(commit).await;
        self.deps.metrics.payment_commit(kind, asked.elapsed());
        match (committed, retry) {
            (Ok(()), _) => {
                // The key's row exists now: later commits complete it.
                if let Some(i) = self.idem.as_mut() {
                    i.claim = None;
                }
            }
            (Err(CommitError::Fenced), Some(retry)) => {
                tracing::info!(payment_id = %next.id, "idempotency key taken over; committing the PSP's answer without it");
                self.idem = None;
                self.fenced = true;
                self.deps.store.commit(retry).await?;
            }
            (Err(e), _) => return Err(e.into()),
        }
        if let Some((from, to)) = moved {
            self.deps.metrics.transition(from, to);
        }
        self.live.payment = next;
        Ok(())
    }

    pub(super) fn new_attempt_id(&self) -> AttemptId {
        AttemptId::from_trusted(format!("{}{}", AttemptId::PREFIX, self.deps.clock.unique()))
    }

    pub(super) fn new_refund_id(&self) -> RefundId {
        RefundId::from_trusted(format!("{}{}", RefundId::PREFIX, self.deps.clock.unique()))
    }

    pub(super) fn payment_reply(&self, status: u16) -> Reply {
        Reply {
            status,
            body: reply_body(&self.payment().object()),
            stored: false,
        }
    }

    /// The amount of a capture or refund: the one asked for, in the payment's currency, or `default`.
    pub(super) fn amount_in_currency(&self, amount: Option<Money>, default: i64) -> Result<i64, PaymentError> {
        match amount {
            None => Ok(default),
            Some(m) if m.currency != self.payment().currency => Err(PaymentError::InvalidParam {
                param: "amount.currency",
                message: "amount.currency must be the payment's currency",
            }),
            Some(m) => Ok(m.minor),
        }
    }
}

pub(super) fn reply_body(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A payment's object (docs/API.md) as JSON text, for an answer and an event alike.
pub(super) fn payment_object(p: &Payment) -> Box<serde_json::value::RawValue> {
    // The object's fields are strings, numbers and maps: it always serializes.
    serde_json::value::to_raw_value(&p.object()).unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
}
