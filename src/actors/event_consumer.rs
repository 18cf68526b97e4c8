//! `EventConsumer`: one per JetStream partition of PSP events. It pulls a bounded batch, finds
//! each event's payment by its PSP reference, hands the event to that payment's actor, and
//! acks only once the actor's commit is durable. An event whose payment is not there yet is
//! NAKed with a delay (the API's own commit may still be in flight). No event is ever dropped:
//! JetStream redelivers without limit (with a capped backoff), and once an event has failed
//! `[nats] max_deliver` times payrail parks it as a dead letter, envelope and all, and only
//! then acknowledges it; an operator replays it with `POST /admin/v1/dead_letters/{id}/replay`.
//! A panic while handling one event is caught, counted as a restart, and the event NAKed.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::jetstream::AckKind;
use futures_util::FutureExt;

use super::mailbox::{ActorStats, Mailbox};
use super::payment::{Op, PaymentCall};
use super::registry::PaymentRegistry;
use crate::adapters::nats::{Nats, PspEvent};
use crate::adapters::postgres::events::EventPayment;
use crate::adapters::postgres::payouts::PayoutEvent;
use crate::adapters::postgres::Db;
use crate::config::NatsConfig;
use crate::metrics::Metrics;

pub struct EventConsumer {
    pub partition: u32,
    pub nats: Nats,
    pub db: Db,
    pub registry: Arc<PaymentRegistry>,
    pub config: NatsConfig,
    pub kind: Arc<ActorStats>,
    pub mailbox: Arc<Mailbox>,
    pub metrics: Arc<Metrics>,
    pub shutdown: crate::shutdown::Shutdown,
}

impl Actor for EventConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.kind.live.fetch_add(1, Ordering::Relaxed);
        let worker = Worker {
            partition: self.partition,
            nats: self.nats.clone(),
            db: self.db.clone(),
            registry: self.registry.clone(),
            config: self.config.clone(),
            kind: self.kind.clone(),
            mailbox: self.mailbox.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            waits: dashmap::DashMap::new(),
        };
        ctx.spawn(async move { worker.run().await }.into_actor(self));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.kind.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long an event waits for a commit under way that stores its PSP reference. A ledger
/// batch takes milliseconds; the bound only matters when PostgreSQL stalls.
const LANDING_WAIT: Duration = Duration::from_secs(2);

/// What happened to one delivery.
enum Verdict {
    Ack(&'static str),
    /// Failed: deliver it again later, or park it once it failed often enough.
    Retry(&'static str, &'static str),
    /// Not the event's doing: in cluster mode its payment's partition is between owners
    /// (`moving`: a lease moves within seconds); or the payment is held up by the PSP's API (an
    /// earlier attempt it must resolve first) or by payrail's own bounds (a full mailbox)
    /// (`waiting`). Delivered again shortly, and never parked for it: the event applies once the
    /// PSP or the payment can take it.
    Wait(&'static str),
}

/// What becomes of an event whose handling failed on its `delivered`-th delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// NAK: JetStream delivers it again after this delay.
    Redeliver(Duration),
    /// Store it as a dead letter, then acknowledge it.
    DeadLetter,
}

/// The one rule, shared with the simulation: back off with the number of deliveries (0.5 s,
/// 1 s, 1.5 s, … at most 10 s), and park the event after `max_deliver` failures.
pub fn disposition(delivered: i64, max_deliver: i64) -> Disposition {
    if delivered >= max_deliver.max(1) {
        Disposition::DeadLetter
    } else {
        Disposition::Redeliver(Duration::from_millis(500 * delivered.clamp(1, 20) as u64))
    }
}

/// How long ago `published` (nanoseconds since the epoch, JetStream's clock) was; zero when the
/// clocks disagree so that it looks to be in the future.
fn age_of(published: i128) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    Duration::from_nanos(u64::try_from(now - published).unwrap_or(0))
}

struct Worker {
    partition: u32,
    nats: Nats,
    db: Db,
    registry: Arc<PaymentRegistry>,
    config: NatsConfig,
    kind: Arc<ActorStats>,
    mailbox: Arc<Mailbox>,
    metrics: Arc<Metrics>,
    shutdown: crate::shutdown::Shutdown,
    /// Cluster mode: deliveries of each event (by stream sequence) that only waited for its
    /// payment's partition to settle on a node. They do not count toward parking it.
    waits: dashmap::DashMap<u64, i64>,
}

/// Events whose waits are remembered at most; past it the memory is cleared (their waits then
/// count toward parking like failures: the safe side).
const MAX_REMEMBERED_WAITS: usize = 10_000;

impl Worker {
    /// Pulls until shutdown; a broken connection or consumer is retried with a capped backoff.
    /// On shutdown it finishes the batch in hand (its events acked or NAKed) and stops.
    async fn run(self) {
        let _running = self.shutdown.enter();
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_stopping() {
            let consumer = match self
                .nats
                .psp_consumer(self.partition, Duration::from_secs(self.config.ack_wait_secs), -1)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(partition = self.partition, error = %e, "PSP event consumer unavailable; retrying");
                    self.shutdown.sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            while !self.shutdown.is_stopping() {
                // Cluster mode: only the owner of the cluster partition with this number reads
                // it; the others wait, ready to take over when its lease moves.
                if !self.registry.owns_partition(self.partition) {
                    self.shutdown.sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let messages = match crate::adapters::nats::fetch_batch(&consumer, self.config.fetch_batch).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(partition = self.partition, error = %e, "PSP event fetch failed");
                        self.shutdown.sleep(Duration::from_millis(500)).await;
                        break;
                    }
                };
                // The batch's events for different payments run at once; one payment's events
                // keep their order (the batch arrives in stream order, grouped by reference).
                // Each envelope is read once, here; an unreadable one is parked.
                type Delivery = (
                    async_nats::jetstream::Message,
                    Result<PspEvent, rmp_serde::decode::Error>,
                );
                let mut groups: Vec<(String, Vec<Delivery>)> = Vec::new();
                for m in messages {
                    let event = rmp_serde::from_slice::<PspEvent>(&m.payload);
                    let key = event.as_ref().map(|e| e.reference.clone()).unwrap_or_default();
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, g)) => g.push((m, event)),
                        None => groups.push((key, vec![(m, event)])),
                    }
                }
                let this = &self;
                futures_util::future::join_all(groups.into_iter().map(|(_, group)| async move {
                    for (message, event) in group {
                        this.settle(&message, event).await;
                    }
                }))
                .await;
            }
        }
    }

    /// Handles one delivery and acks or NAKs it.
    async fn settle(
        &self,
        message: &async_nats::jetstream::Message,
        event: Result<PspEvent, rmp_serde::decode::Error>,
    ) {
        self.mailbox.sent();
        let verdict = AssertUnwindSafe(self.handle(message, event)).catch_unwind().await;
        self.mailbox.received("psp_event");
        let verdict = verdict.unwrap_or_else(|_| {
            tracing::error!(
                partition = self.partition,
                "event consumer panicked on an event; it will be redelivered"
            );
            self.kind.restarts.fetch_add(1, Ordering::Relaxed);
            Verdict::Retry("panicked", "the consumer panicked on it")
        });
        let (delivered, sequence) = message
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let waited = self.waits.get(&sequence).map_or(0, |w| *w);
        let result = match verdict {
            Verdict::Ack(outcome) => {
                self.waits.remove(&sequence);
                self.record(message, outcome);
                message.ack().await
            }
            Verdict::Wait(outcome) => {
                if self.waits.len() >= MAX_REMEMBERED_WAITS {
                    self.waits.clear();
                }
                *self.waits.entry(sequence).or_insert(0) += 1;
                self.record(message, outcome);
                if let (Ok(info), "waiting") = (message.info(), outcome) {
                    self.metrics
                        .psp_event_waiting(age_of(info.published.unix_timestamp_nanos()));
                }
                let delay = Duration::from_millis(500 * (waited + 1).clamp(1, 10) as u64);
                message.ack_with(AckKind::Nak(Some(delay))).await
            }
            Verdict::Retry(outcome, reason) => match disposition(delivered - waited, self.config.max_deliver) {
                Disposition::DeadLetter if self.park(message, reason, delivered as i32).await => {
                    self.waits.remove(&sequence);
                    self.record(message, "dead_lettered");
                    message.ack().await
                }
                Disposition::DeadLetter => {
                    // Not parked (PostgreSQL is down): keep it in JetStream, try again later.
                    self.record(message, outcome);
                    message.ack_with(AckKind::Nak(Some(Duration::from_secs(10)))).await
                }
                Disposition::Redeliver(delay) => {
                    self.record(message, outcome);
                    message.ack_with(AckKind::Nak(Some(delay))).await
                }
            },
        };
        if let Err(e) = result {
            tracing::warn!(partition = self.partition, error = %e, "acknowledging a PSP event failed; it will be redelivered");
        }
    }

    /// Stores the delivery as a dead letter with its envelope, so that it can be replayed.
    async fn park(&self, message: &async_nats::jetstream::Message, reason: &str, delivered: i32) -> bool {
        let event = rmp_serde::from_slice::<PspEvent>(&message.payload).ok();
        let parked = match &event {
            Some(e) => {
                self.db
                    .dead_letter(
                        &e.provider,
                        &e.event_id,
                        &e.event_type,
                        &e.reference,
                        reason,
                        delivered,
                        &e.raw,
                        Some(&message.payload),
                    )
                    .await
            }
            None => {
                self.db
                    .dead_letter(
                        "unknown",
                        "unknown",
                        "unknown",
                        "",
                        reason,
                        delivered,
                        &message.payload,
                        None,
                    )
                    .await
            }
        };
        match parked {
            Ok(()) => {
                tracing::error!(partition = self.partition, reason, "PSP event parked as a dead letter");
                true
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "could not park a PSP event; it stays in JetStream");
                false
            }
        }
    }

    fn record(&self, message: &async_nats::jetstream::Message, outcome: &'static str) {
        let provider = message.subject.as_str().rsplit('.').next().unwrap_or("unknown");
        self.metrics.psp_event(provider, outcome);
    }

    /// `event` is the message's envelope, as the batch read it.
    async fn handle(
        &self,
        message: &async_nats::jetstream::Message,
        event: Result<PspEvent, rmp_serde::decode::Error>,
    ) -> Verdict {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let event: PspEvent = match event {
            // The sandbox-only supervision drill: panics on the first delivery only.
            Ok(e) if e.provider == "sandbox" && e.event_type == CONSUMER_PANIC_ONCE && delivered == 1 => {
                panic!("sandbox: {CONSUMER_PANIC_ONCE} panics once inside the event consumer")
            }
            Ok(e) => e,
            Err(e) => {
                tracing::error!(partition = self.partition, error = %e, "unreadable PSP event");
                return if self.park(message, "unreadable envelope", delivered as i32).await {
                    Verdict::Ack("dead_lettered")
                } else {
                    Verdict::Retry("retried", "unreadable envelope")
                };
            }
        };
        // Only the payout rail's own events (the sandbox's, in this build) move payouts: signed
        // with the deployment's secret, never with a merchant connector's (a merchant could
        // otherwise report its own paid payout as failed and be credited again).
        if event.event_type.starts_with("payout.") && event.provider == "sandbox" && event.merchant.is_some() {
            tracing::warn!(event_id = %event.event_id, "a connector's event about a payout; dropped");
            return Verdict::Ack("foreign");
        }
        if event.event_type.starts_with("payout.") && !event.reference.is_empty() && event.provider == "sandbox" {
            // The payout rail's report: it belongs to a payout, not a payment.
            let object: serde_json::Value = serde_json::from_slice(&event.object).unwrap_or_default();
            return match self
                .db
                .apply_payout_event(
                    &event.provider,
                    &event.event_id,
                    &event.event_type,
                    &event.reference,
                    &object,
                    &event.raw,
                )
                .await
            {
                Ok(PayoutEvent::Applied) => Verdict::Ack("applied"),
                Ok(PayoutEvent::Refused) => Verdict::Ack("refused"),
                Ok(PayoutEvent::Duplicate) => Verdict::Ack("duplicate"),
                Ok(PayoutEvent::Unknown) => Verdict::Retry("unknown_reference", "no payout with this id"),
                Err(_) => Verdict::Retry("retried", "the database was unavailable"),
            };
        }
        let look_up = || {
            self.db
                .payment_of_event(&event.provider, &event.reference, &event.event_id)
        };
        // A commit storing this reference under way here (the sandbox's event most often
        // outruns its payment's commit): wait for it first, so that one look-up finds it.
        let landing = &self.registry.deps().landing;
        let waited = !event.reference.is_empty() && landing.wait(&event.reference, LANDING_WAIT).await;
        let mut found = match look_up().await {
            Ok(found) => found,
            Err(_) => return Verdict::Retry("retried", "the database was unavailable"),
        };
        // Not stored yet, but its commit began here since (none was under way before the
        // look-up; one that was, and still runs after the bound, is not waited for twice): wait
        // for it and look again, rather than come back in half a second.
        if found.is_none()
            && !waited
            && !event.reference.is_empty()
            && landing.wait(&event.reference, LANDING_WAIT).await
        {
            found = match look_up().await {
                Ok(found) => found,
                Err(_) => return Verdict::Retry("retried", "the database was unavailable"),
            };
        }
        let Some(EventPayment {
            payment: payment_id,
            merchant,
            processed,
        }) = found
        else {
            if event.reference.is_empty() || !concerns_a_payment(&event.event_type) {
                // Recorded, acknowledged, ignored (docs/API.md).
                return match self
                    .db
                    .record_event(&event.provider, &event.event_id, &event.event_type, &event.raw)
                    .await
                {
                    Ok(()) => Verdict::Ack("ignored"),
                    Err(_) => Verdict::Retry("retried", "the database was unavailable"),
                };
            }
            return Verdict::Retry("unknown_reference", "no payment with this PSP reference");
        };
        if event.merchant.as_deref().is_some_and(|m| m != merchant.as_str()) {
            // Verified with one merchant's connector secret, about another merchant's payment:
            // never applied, never recorded (so it cannot shadow the real event's id).
            tracing::warn!(payment_id = %payment_id, event_id = %event.event_id, "a connector's event names another merchant's payment; dropped");
            return Verdict::Ack("foreign");
        }
        if processed {
            // Recorded already (a redelivery, or the PSP's retry after JetStream's duplicate
            // window): nothing to apply, no need to wake the payment.
            return Verdict::Ack("duplicate");
        }
        // An event's deliveries are handled one at a time here (one reference, so one
        // partition, whose worker takes its batches in turn, each grouped by reference): the
        // actor can save its own look-up. Across a partition's handover the primary key of
        // `processed_events` still refuses a second record (`PspEvent::unrecorded`).
        let event = PspEvent {
            unrecorded: true,
            ..event
        };
        let call = PaymentCall::new(merchant, Op::PspEvent(Arc::new(event)), None);
        match self.registry.call(&payment_id, call).await {
            Ok(reply) if reply.status == super::payment_flow::DUPLICATE_EVENT => Verdict::Ack("duplicate"),
            Ok(_) => Verdict::Ack("applied"),
            Err(e) if super::forward::is_handover(&e) => {
                tracing::info!(payment_id = %payment_id, error = %e, "PSP event waits for its payment's partition to settle on a node");
                Verdict::Wait("moving")
            }
            Err(e) if e.is_pressure() => {
                tracing::info!(payment_id = %payment_id, error = %e, "PSP event waits: its payment cannot take it now");
                Verdict::Wait("waiting")
            }
            Err(e) => {
                tracing::warn!(payment_id = %payment_id, error = %e, "PSP event not applied yet; it will be redelivered");
                Verdict::Retry("retried", "its payment could not apply it")
            }
        }
    }
}

/// A sandbox-only event type that panics inside the consumer on its first delivery: the
/// consumer half of the supervision drill.
pub const CONSUMER_PANIC_ONCE: &str = "sandbox.panic_once_in_consumer";

/// Event types that belong to a payment: without one yet, they wait for it.
fn concerns_a_payment(event_type: &str) -> bool {
    event_type.starts_with("payment_intent.")
        || event_type.starts_with("charge.")
        || matches!(
            event_type,
            "adyen.authorisation"
                | "adyen.capture"
                | "adyen.capture_failed"
                | "adyen.cancellation"
                | "adyen.refund"
                | "adyen.refund_failed"
                | "adyen.chargeback"
                | "adyen.chargeback_reversed"
        )
}
