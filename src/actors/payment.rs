//! `PaymentActor`: one per live payment. It owns the payment's state and handles one message
//! at a time to completion (`AtomicResponse`: no other message starts while one awaits), so two
//! captures, or a refund and a PSP event, can never interleave.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;
use futures_util::FutureExt;
use tracing::Instrument;

use super::error::PaymentError;
use super::mailbox::Mailbox;
use super::payment_flow::{process, Live, PaymentDeps};
use super::registry::ActorEntry;
use crate::domain::{MerchantId, Money, PaymentId, RefundId};

/// How long an actor whose payment could not be loaded keeps answering with that error before
/// it stops, so a burst of calls for a missing id costs one load.
const FAILED_LINGER: Duration = Duration::from_millis(200);

/// The idempotency record a call completes in its commit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IdemKey {
    pub merchant: MerchantId,
    pub key: String,
    /// The key's fence: which takeover of the key this request holds. A commit that completes
    /// the key must still find this fence, or it lost the key to a newer request.
    pub fence: i64,
    /// The key has no row yet: the call's first commit claims it ([`KeyClaim`]). Cleared once
    /// a commit has.
    #[serde(default)]
    pub claim: Option<crate::adapters::postgres::idempotency::KeyClaim>,
}

/// A merchant's operation on a payment. Serializable: in cluster mode a call travels to the
/// node that owns the payment (`actors::forward`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// Store the new payment the actor was started with (it is not in PostgreSQL yet) and,
    /// with `confirm`, authorize it at once. Answered `201`.
    Create {
        confirm: bool,
    },
    /// Authorize (and with automatic capture, capture). `created`: this confirms a payment the
    /// same request created, so the answer is `201`.
    Confirm {
        payment_method: Option<String>,
        created: bool,
    },
    Capture {
        amount: Option<Money>,
    },
    Cancel,
    /// `resume`: the refund an interrupted request with the same idempotency key created.
    Refund {
        amount: Option<Money>,
        reason: Option<String>,
        resume: Option<RefundId>,
        /// How a split payment's refund is shared (docs/API.md, "Split payments").
        share: RefundShare,
    },
    /// Catch up with the PSP after the customer completed 3-D Secure.
    Sync,
    /// The merchant approves a payment a risk rule held for review (and, with automatic
    /// capture, it is captured).
    Approve,
    /// The merchant rejects it: the authorization is canceled at the PSP.
    Reject,
    /// Only complete the PSP attempts left open (the recovery sweeper's call).
    Resolve,
    /// Apply a PSP event (webhook), at most once.
    PspEvent(Arc<crate::adapters::nats::PspEvent>),
    /// Reconciliation found the capture in the PSP's settlement report.
    Settle,
}

/// Who gives back a split payment's refund: the sellers their parts (`reverse_splits`,
/// default true), the platform its application fee's part (`refund_application_fee`, default
/// false: the sellers bear it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefundShare {
    pub reverse_splits: bool,
    pub refund_application_fee: bool,
}

impl Default for RefundShare {
    fn default() -> Self {
        RefundShare {
            reverse_splits: true,
            refund_application_fee: false,
        }
    }
}

impl Op {
    /// The operation as a retry runs it: a refund resumes the one its key already created.
    pub fn resuming(self, resource_id: Option<&str>) -> Op {
        match self {
            Op::Refund {
                amount, reason, share, ..
            } => Op::Refund {
                amount,
                reason,
                resume: resource_id.and_then(RefundId::parse),
                share,
            },
            other => other,
        }
    }

    /// The status of a successful answer.
    pub fn reply_status(&self) -> u16 {
        match self {
            Op::Create { .. } | Op::Confirm { created: true, .. } | Op::Refund { .. } => 201,
            _ => 200,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Confirm { .. } => "confirm",
            Op::Capture { .. } => "capture",
            Op::Cancel => "cancel",
            Op::Refund { .. } => "refund",
            Op::Sync => "sync",
            Op::Approve => "approve",
            Op::Reject => "reject",
            Op::Resolve => "resolve",
            Op::PspEvent(_) => "psp_event",
            Op::Settle => "settle",
        }
    }
}

/// The rendered answer. `stored`: the commit already wrote it as the idempotency record.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub stored: bool,
}

#[derive(Message, Clone, Debug)]
#[rtype(result = "Result<Reply, PaymentError>")]
pub struct PaymentCall {
    pub merchant: MerchantId,
    pub op: Op,
    pub idem: Option<IdemKey>,
    /// The span of whoever sent it (an HTTP request, an event consumer): the actor's span is
    /// its child, so the actor's log lines carry the request id.
    pub parent: tracing::Span,
}

impl PaymentCall {
    /// A call from the current span.
    pub fn new(merchant: MerchantId, op: Op, idem: Option<IdemKey>) -> PaymentCall {
        PaymentCall {
            merchant,
            op,
            idem,
            parent: tracing::Span::current(),
        }
    }
}

pub struct PaymentActor {
    id: PaymentId,
    /// What every payment actor shares: one pointer per actor instead of five fields.
    shared: Arc<ActorShared>,
    /// Also tells this incarnation's registry entry from a later one's (`Arc::ptr_eq`), and
    /// keeps the time of its last message.
    mailbox: Arc<Mailbox>,
    /// `None` until loaded, while a message runs, or after a failure.
    live: Option<Live>,
    /// Boxed: rare, and a live actor should not carry its room.
    load_error: Option<Box<PaymentError>>,
}

/// The registry's settings and handles, shared by all its actors.
pub struct ActorShared {
    pub deps: Arc<PaymentDeps>,
    /// The registry's map, so that a stopping actor removes its own entry (and only its own:
    /// its mailbox tells incarnations apart).
    pub registry: Arc<DashMap<PaymentId, ActorEntry>>,
    pub idle_timeout: Duration,
    pub mailbox_capacity: usize,
    pub kind: Arc<super::ActorStats>,
}

impl PaymentActor {
    pub fn new(id: PaymentId, shared: Arc<ActorShared>, mailbox: Arc<Mailbox>, known: Option<Live>) -> PaymentActor {
        PaymentActor {
            id,
            shared,
            mailbox,
            live: known,
            load_error: None,
        }
    }
}

impl Actor for PaymentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.shared.mailbox_capacity);
        self.shared.kind.live.fetch_add(1, Ordering::Relaxed);
        let deps = self.shared.deps.clone();
        let id = self.id.clone();
        // `wait` holds every message back until the state is loaded (unless its creator
        // handed it over).
        if self.live.is_none() {
            ctx.wait(
                async move { deps.store.load(&id).await }
                    .into_actor(self)
                    .map(|loaded, act, ctx| match loaded {
                        Ok(Some(live)) => {
                            act.mailbox.set_status(status_index(live.payment.status()));
                            act.live = Some(live);
                        }
                        Ok(None) => act.fail(ctx, PaymentError::NotFound("payment")),
                        Err(e) => act.fail(ctx, e.into()),
                    }),
            );
        }
        // No timer of its own: the registry's sweep asks idle actors to passivate
        // (`Passivate`), so a live actor costs no timer entry.
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.shared.kind.live.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .registry
            .remove_if(&self.id, |_, e| Arc::ptr_eq(&e.mailbox, &self.mailbox));
    }
}

/// A payment status as the mailbox keeps it: its place in `Status::ALL`.
pub fn status_index(s: crate::domain::Status) -> u8 {
    crate::domain::Status::ALL
        .iter()
        .position(|x| *x == s)
        .map(|i| i as u8)
        .unwrap_or(Mailbox::UNKNOWN)
}

impl PaymentActor {
    fn fail(&mut self, ctx: &mut Context<Self>, error: PaymentError) {
        self.load_error = Some(Box::new(error));
        self.live = None;
        ctx.run_later(FAILED_LINGER, |_, ctx| ctx.stop());
    }
}

/// The registry's sweep found this actor idle: it stops if it still is (nothing handled for
/// `[actors] idle_timeout_ms`, nothing waiting).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Passivate;

impl Handler<Passivate> for PaymentActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        self.mailbox.passivation_answered();
        if self.mailbox.idle_for(self.shared.idle_timeout) && self.mailbox.depth() == 0 {
            tracing::debug!(payment_id = %self.id, "passivating idle payment actor");
            ctx.stop();
        }
    }
}

impl Handler<PaymentCall> for PaymentActor {
    type Result = AtomicResponse<Self, Result<Reply, PaymentError>>;

    fn handle(&mut self, call: PaymentCall, _ctx: &mut Self::Context) -> Self::Result {
        self.mailbox.received(call.op.name());
        let span =
            tracing::info_span!(parent: &call.parent, "payment_actor", payment_id = %self.id, op = call.op.name());
        let live = match self.live.take() {
            Some(live) if live.payment.merchant_id == call.merchant => live,
            Some(live) => {
                // Another merchant's payment does not exist, as far as this caller can tell.
                self.live = Some(live);
                return AtomicResponse::new(Box::pin(fut::ready(Err(PaymentError::NotFound("payment")))));
            }
            None => {
                let e = self
                    .load_error
                    .as_deref()
                    .cloned()
                    .unwrap_or(PaymentError::Unavailable(crate::actors::error::ACTOR_GONE));
                return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
            }
        };
        let deps = self.shared.deps.clone();
        let started = Instant::now();
        let work = async move {
            let run = process(&deps, live, call.op, call.idem).instrument(span);
            AssertUnwindSafe(run).catch_unwind().await
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(move |result, act, ctx| {
            act.mailbox.touch();
            act.shared.deps.metrics.handled("payment", started.elapsed());
            match result {
                Ok((reply, live, stale)) => {
                    if stale {
                        // Someone else wrote this payment: reload from PostgreSQL on next use.
                        act.shared.kind.restarts.fetch_add(1, Ordering::Relaxed);
                        ctx.stop();
                    } else {
                        act.mailbox.set_status(status_index(live.payment.status()));
                        act.live = Some(live);
                    }
                    reply
                }
                Err(_) => {
                    // A panic in the handler: its state is unknown. Stop; the registry starts a
                    // fresh incarnation from PostgreSQL, and this caller's key is released.
                    tracing::error!(payment_id = %act.id, "payment actor panicked; restarting from PostgreSQL");
                    act.shared.kind.restarts.fetch_add(1, Ordering::Relaxed);
                    ctx.stop();
                    Err(PaymentError::Unavailable(crate::actors::error::ACTOR_GONE))
                }
            }
        })))
    }
}
