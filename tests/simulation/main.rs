//! Deterministic simulation of the payment flow, in the spirit of FoundationDB's simulation
//! testing and TigerBeetle's VOPR (docs/RELIABILITY.md, "Simulation").
//!
//! The real flow (`payrail::actors::payment_flow::process`) runs against a simulated store,
//! PSP and clock. One seeded RNG chooses every interleaving and fault: which actor moves,
//! when the PSP answers and whether it acted first, commits that land but report failure,
//! store outages, clients that give up and retry after their key's lease ran out, a second
//! actor incarnation racing the first, process crashes, and PSP events that come twice, late
//! and out of order. After the run drains to quiescence, the invariants are checked against
//! the PSP's own truth. A failing seed prints itself and replays exactly.
//!
//! ```text
//! cargo test --test simulation                          # the regression scenarios + 300 seeds
//! cargo test --release --test simulation -- --seeds 20000
//! cargo test --test simulation -- --seed 1234 --verbose # replay one seed with its trace
//! cargo test --test simulation -- --seeds 5000 --faults lease_expiry
//! ```

mod scenarios;
mod world;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde_json::Value;

use payrail::actors::event_consumer::{disposition, Disposition};
use payrail::actors::payment_flow::{process, Live, PaymentDeps};
use payrail::actors::{IdemKey, Op, Reply};
use payrail::adapters::nats::PspEvent;
use payrail::adapters::postgres::commit::AttemptOutcome;
use payrail::adapters::postgres::idempotency::{Begin, KeyClaim, Released};
use payrail::adapters::psp::{IntentStatus, PspError, PspRefundStatus};
use payrail::api::error::ApiError;
use payrail::api::idempotency::{completion, Completion};
use payrail::domain::{CaptureStrategy, Currency, JournalKind, MerchantId, Money, Payment, PaymentId};
use world::*;

/// The key lease, as `[idempotency] in_flight_lease_ms` sets it.
const LEASE_MS: i64 = 1_500;
/// JetStream's `max_deliver` for PSP events.
const MAX_DELIVER: i64 = 5;
/// The sweeper resolves attempts open for longer than this.
const SWEEP_AFTER_MS: i64 = 2_000;
/// A client stops retrying after this many tries (more while draining).
const MAX_TRIES: u32 = 8;
const STEPS: usize = 400;

type Task = Pin<Box<dyn Future<Output = (Result<Reply, ApiError>, Live, bool)>>>;

#[derive(Clone, Debug)]
enum Origin {
    /// A client request: its index and the connection that sent it.
    Client(usize, u64),
    /// A PSP event delivery, by serial.
    Consumer(u64),
    Sweeper,
}

struct Msg {
    op: Op,
    idem: Option<IdemKey>,
    origin: Origin,
    /// A new payment its creator hands over (the registry's `call_with`).
    known: Option<Live>,
}

/// One incarnation of a payment's actor: one message at a time, to completion.
struct Incarnation {
    payment: PaymentId,
    live: Option<Live>,
    mailbox: VecDeque<Msg>,
    running: Option<(Origin, Task)>,
    /// Superseded by a newer incarnation: it finishes its message and stops.
    zombie: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Create the payment; `true`: and confirm it in the same request.
    Create(bool),
    Confirm,
    Capture,
    Cancel,
    Refund,
    /// Approve a payment held for review.
    Approve,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ReqState {
    /// Not sent yet, or to be retried.
    Ready,
    Waiting,
    Done,
}

struct Request {
    payment: PaymentId,
    key: String,
    kind: Kind,
    amount: Option<i64>,
    state: ReqState,
    tries: u32,
    fence: i64,
    /// A create sent without a claim, its payment's first commit to claim the key
    /// (`api::idempotency::run_first`); cleared by its answer.
    first: bool,
    /// A create: the id the script gave its payment (its first send's), and the id of the new
    /// payment its current send would store. As the API draws a new id for every create it
    /// runs, every resend and every fallback to a claim tries a new id; the request's and its
    /// successors' `payment` become whichever id the answer names.
    base: PaymentId,
    trying: PaymentId,
    /// The connection now waiting; an answer for an older one goes nowhere.
    conn: u64,
    sent: bool,
    answer: Option<(u16, Vec<u8>)>,
}

struct Sim {
    w: Shared,
    deps: Arc<PaymentDeps>,
    merchant: MerchantId,
    actors: Vec<Incarnation>,
    requests: Vec<Request>,
    payments: Vec<PaymentId>,
    /// New payments the clients' creates carry.
    drafts: Vec<Payment>,
    connections: u64,
}

fn poll_once<T>(fut: &mut Pin<Box<dyn Future<Output = T>>>) -> Poll<T> {
    let waker = futures_util::task::noop_waker_ref();
    fut.as_mut().poll(&mut Context::from_waker(waker))
}

fn now_or_never<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    let waker = futures_util::task::noop_waker_ref();
    match fut.as_mut().poll(&mut Context::from_waker(waker)) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a simulated store call must answer at once"),
    }
}

impl Sim {
    fn new(seed: u64, faults: Faults, verbose: bool) -> Sim {
        let mut sim = Sim::bare(seed, faults, verbose);
        sim.setup();
        sim
    }

    /// A world with no payments yet, for scripted scenarios.
    fn bare(seed: u64, faults: Faults, verbose: bool) -> Sim {
        let w: Shared = Arc::new(std::sync::Mutex::new(World::new(seed, faults, verbose)));
        let deps = Arc::new(PaymentDeps {
            store: Arc::new(SimStore(w.clone())),
            psp: Arc::new(SimPsp(w.clone())),
            connectors: Arc::new(SimConnectors::new(Arc::new(SimPsp(w.clone())))),
            psp_timeout: None,
            clock: Arc::new(SimClock(w.clone())),
            risk: Arc::new(payrail::actors::risk::NoRisk),
            metrics: Arc::new(payrail::metrics::Metrics::default()),
            landing: Default::default(),
        });
        Sim {
            w,
            deps,
            merchant: MerchantId::from_trusted("mer_sim".into()),
            actors: Vec::new(),
            requests: Vec::new(),
            payments: Vec::new(),
            drafts: Vec::new(),
            connections: 0,
        }
    }

    fn rng(&self, n: u64) -> u64 {
        lock(&self.w).rng.below(n)
    }

    fn chance(&self, per_mille: u64) -> bool {
        lock(&self.w).rng.chance(per_mille)
    }

    fn note(&self, line: String) {
        lock(&self.w).note(line);
    }

    /// One or two payments, each with a merchant's script: confirm, then capture or cancel,
    /// then refunds.
    fn setup(&mut self) {
        let count = 1 + self.rng(2);
        for _ in 0..count {
            let amount = 100 + self.rng(50) as i64 * 100;
            let manual = self.chance(600);
            let (id, draft) = self.new_payment(amount, manual);
            self.drafts.push(draft);
            let confirm_at_once = self.chance(500);
            self.request(&id, Kind::Create(confirm_at_once), None);
            if !confirm_at_once {
                self.request(&id, Kind::Confirm, None);
            }
            let mut captured = amount;
            if manual {
                if self.chance(150) {
                    self.request(&id, Kind::Cancel, None);
                    continue;
                }
                captured = if self.chance(500) {
                    amount
                } else {
                    1 + self.rng(amount as u64) as i64
                };
                self.request(&id, Kind::Capture, Some(captured));
            }
            for _ in 0..self.rng(5) {
                let part = 1 + self.rng((captured as u64 / 2).max(1)) as i64;
                self.request(&id, Kind::Refund, Some(part));
            }
        }
    }

    /// A pending payment in the store, as a create leaves it.
    fn add_payment(&mut self, amount: i64, manual: bool) -> PaymentId {
        let (id, payment) = self.new_payment(amount, manual);
        lock(&self.w).db.payments.insert(id.clone(), payment);
        id
    }

    /// A new payment as the API builds it from a create request, not stored yet.
    fn new_payment(&mut self, amount: i64, manual: bool) -> (PaymentId, Payment) {
        let n = self.payments.len();
        {
            let at = payrail::actors::store::Clock::now(&SimClock(self.w.clone()));
            let id = PaymentId::from_trusted(format!("pay_sim{n}"));
            let payment = Payment {
                order_id: format!("order-{n}"),
                capture_strategy: if manual {
                    CaptureStrategy::Manual
                } else {
                    CaptureStrategy::Automatic
                },
                fee_bps: 290,
                fee_fixed: 30,
                ..Payment::pending(
                    id.clone(),
                    self.merchant.clone(),
                    Money::new(amount, Currency::parse("EUR").expect("EUR")),
                    "pm_card_visa".into(),
                    "sim".into(),
                    at,
                )
            };
            self.payments.push(id.clone());
            (id, payment)
        }
    }

    fn request(&mut self, payment: &PaymentId, kind: Kind, amount: Option<i64>) -> usize {
        let key = format!("key{}", self.requests.len());
        self.requests.push(Request {
            payment: payment.clone(),
            key,
            kind,
            amount,
            state: ReqState::Ready,
            tries: 0,
            fence: 0,
            first: false,
            base: payment.clone(),
            trying: payment.clone(),
            conn: 0,
            sent: false,
            answer: None,
        });
        self.requests.len() - 1
    }

    /// A request may go once the one before it on its payment went at least once.
    fn sendable(&self) -> Vec<usize> {
        (0..self.requests.len())
            .filter(|&i| self.requests[i].state == ReqState::Ready)
            .filter(|&i| {
                let r = &self.requests[i];
                (0..i)
                    .rev()
                    .find(|&j| self.requests[j].payment == r.payment)
                    .map(|j| self.requests[j].sent)
                    .unwrap_or(true)
            })
            .collect()
    }

    /// The client sends (or resends) request `i`, as the API's idempotency layer takes it.
    fn send(&mut self, i: usize) {
        let (key, kind, amount) = {
            let r = &self.requests[i];
            (r.key.clone(), r.kind, r.amount)
        };
        self.requests[i].sent = true;
        self.requests[i].tries += 1;
        let fingerprint = format!("{kind:?}:{amount:?}");
        if let Kind::Create(confirm) = kind {
            // As the API sends every create first: no claim, the payment's first commit claims.
            self.note(format!("client: sends {key} ({kind:?}) claimed by its first commit"));
            self.connections += 1;
            let conn = self.connections;
            let r = &mut self.requests[i];
            r.state = ReqState::Waiting;
            r.fence = 1;
            r.first = true;
            r.conn = conn;
            let payment = match r.tries {
                1 => r.base.clone(),
                n => PaymentId::from_trusted(format!("{}r{n}", r.base)),
            };
            r.trying = payment.clone();
            let draft = self.draft(i, &payment);
            let msg = Msg {
                op: Op::Create { confirm },
                idem: Some(IdemKey {
                    merchant: self.merchant.clone(),
                    key,
                    fence: 1,
                    claim: Some(KeyClaim {
                        fingerprint: fingerprint.into_bytes(),
                        lease_ms: LEASE_MS as u64,
                        holder: None,
                    }),
                }),
                origin: Origin::Client(i, conn),
                known: Some(Live {
                    payment: draft,
                    open: Vec::new(),
                }),
            };
            self.deliver(&payment, msg);
            return;
        }
        self.claim_and_send(i);
    }

    /// The request claims its key, as `api::idempotency::run` does, and goes on as the claim says.
    fn claim_and_send(&mut self, i: usize) {
        let (key, kind, amount) = {
            let r = &self.requests[i];
            (r.key.clone(), r.kind, r.amount)
        };
        let fingerprint = format!("{kind:?}:{amount:?}");
        let begun = lock(&self.w).idempotency_begin(&key, &fingerprint, LEASE_MS);
        self.note(format!("client: sends {key} ({kind:?} {amount:?}) -> {begun:?}"));
        match begun {
            Ok(Begin::Proceed { resource_id, fence }) => {
                self.connections += 1;
                let conn = self.connections;
                let r = &mut self.requests[i];
                r.state = ReqState::Waiting;
                r.fence = fence;
                r.conn = conn;
                let money = |v: i64| Money::new(v, Currency::parse("EUR").expect("EUR"));
                let mut payment = self.requests[i].payment.clone();
                if let Kind::Create(_) = kind {
                    // A new payment gets a new id; one the key created is resumed.
                    payment = match resource_id.as_deref() {
                        Some(id) => PaymentId::from_trusted(id.to_owned()),
                        None => PaymentId::from_trusted(format!("{}c", self.requests[i].trying)),
                    };
                    self.requests[i].trying = payment.clone();
                }
                let mut known = None;
                let op = match kind {
                    Kind::Create(confirm) if resource_id.is_none() => {
                        known = Some(Live {
                            payment: self.draft(i, &payment),
                            open: Vec::new(),
                        });
                        Op::Create { confirm }
                    }
                    // The key already created it (api/payments.rs, create): confirm it, or
                    // answer with it as stored.
                    Kind::Create(true) => Op::Confirm {
                        payment_method: None,
                        created: true,
                    },
                    Kind::Create(false) => {
                        let stored = lock(&self.w).db.payments.get(&payment).cloned();
                        let reply = stored
                            .map(|p| Reply {
                                status: 201,
                                body: serde_json::to_vec(&p.to_object()).unwrap_or_default(),
                                stored: false,
                            })
                            .ok_or(ApiError::NotFound("payment"));
                        self.finish(Origin::Client(i, conn), reply);
                        return;
                    }
                    Kind::Confirm => Op::Confirm {
                        payment_method: None,
                        created: false,
                    },
                    Kind::Capture => Op::Capture {
                        amount: amount.map(money),
                    },
                    Kind::Cancel => Op::Cancel,
                    Kind::Approve => Op::Approve,
                    Kind::Refund => Op::Refund {
                        amount: amount.map(money),
                        reason: None,
                        resume: None,
                        share: Default::default(),
                    },
                }
                .resuming(resource_id.as_deref());
                let msg = Msg {
                    op,
                    idem: Some(IdemKey {
                        merchant: self.merchant.clone(),
                        key,
                        fence,
                        claim: None,
                    }),
                    origin: Origin::Client(i, conn),
                    known,
                };
                self.deliver(&payment, msg);
            }
            Ok(Begin::Replay { status, body }) => self.done(i, status, body),
            Ok(Begin::InFlight) | Err(_) => self.retry_later(i),
            Ok(Begin::Mismatch) => panic!("the simulation never reuses a key for another request"),
        }
    }

    /// The script's draft of request `i`'s new payment, under `id`.
    fn draft(&self, i: usize, id: &PaymentId) -> Payment {
        let base = &self.requests[i].base;
        let mut draft = self.drafts.iter().find(|d| &d.id == base).cloned().expect("draft");
        draft.id = id.clone();
        draft
    }

    /// Request `i` has its final answer. A create's names its payment: the script's later
    /// requests for it go to that id.
    fn done(&mut self, i: usize, status: u16, body: Vec<u8>) {
        if let (Kind::Create(_), 201) = (self.requests[i].kind, status) {
            let named = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["payment_id"].as_str().map(str::to_owned));
            if let Some(id) = named.map(PaymentId::from_trusted) {
                let base = self.requests[i].base.clone();
                if id != base {
                    self.note(format!("client: {} created {id}", self.requests[i].key));
                }
                for r in self.requests.iter_mut().filter(|r| r.payment == base) {
                    r.payment = id.clone();
                }
            }
        }
        self.requests[i].state = ReqState::Done;
        self.requests[i].answer = Some((status, body));
    }

    fn retry_later(&mut self, i: usize) {
        let calm = lock(&self.w).calm;
        let r = &mut self.requests[i];
        r.state = if r.tries >= MAX_TRIES && !calm {
            ReqState::Done
        } else {
            ReqState::Ready
        };
    }

    /// The mailbox of the payment's current incarnation (activating one if none is live).
    fn deliver(&mut self, payment: &PaymentId, msg: Msg) {
        let at = match self.actors.iter().position(|a| &a.payment == payment && !a.zombie) {
            Some(at) => at,
            None => {
                self.actors.push(Incarnation {
                    payment: payment.clone(),
                    live: None,
                    mailbox: VecDeque::new(),
                    running: None,
                    zombie: false,
                });
                self.actors.len() - 1
            }
        };
        self.actors[at].mailbox.push_back(msg);
    }

    fn runnable(&self) -> Vec<usize> {
        (0..self.actors.len())
            .filter(|&i| self.actors[i].running.is_some() || !self.actors[i].mailbox.is_empty())
            .collect()
    }

    /// Moves incarnation `i` on: starts its next message, or polls the one it runs.
    fn step_actor(&mut self, i: usize) {
        if self.actors[i].running.is_none() {
            let Some(msg) = self.actors[i].mailbox.pop_front() else {
                return;
            };
            if self.actors[i].live.is_none() {
                let payment = self.actors[i].payment.clone();
                let loaded = match msg.known.clone() {
                    Some(known) => Ok(Some(known)),
                    None => now_or_never(self.deps.store.load(&payment)),
                };
                match loaded {
                    Ok(Some(live)) => self.actors[i].live = Some(live),
                    Ok(None) => return self.finish(msg.origin, Err(ApiError::NotFound("payment"))),
                    Err(e) => return self.finish(msg.origin, Err(e.into())),
                }
            }
            let live = self.actors[i].live.take().expect("loaded");
            let deps = self.deps.clone();
            let (op, idem) = (msg.op, msg.idem);
            self.note(format!("actor {}: starts {}", self.actors[i].payment, op.name()));
            let task: Task = Box::pin(async move {
                let (result, live, stale) = process(&deps, live, op, idem).await;
                (result.map_err(ApiError::from), live, stale)
            });
            self.actors[i].running = Some((msg.origin, task));
        }
        let polled = {
            let (_, task) = self.actors[i].running.as_mut().expect("running");
            poll_once(task)
        };
        if let Poll::Ready((result, live, stale)) = polled {
            let (origin, _) = self.actors[i].running.take().expect("running");
            self.note(format!(
                "actor {}: answers {:?}{}",
                self.actors[i].payment,
                result.as_ref().map(|r| r.status).map_err(|e| e.code()),
                if stale { " (stale: reloads)" } else { "" }
            ));
            self.actors[i].live = if stale { None } else { Some(live) };
            if self.actors[i].zombie {
                self.actors.remove(i);
            }
            self.finish(origin, result);
        }
    }

    /// Hands an answer to whoever asked.
    fn finish(&mut self, origin: Origin, result: Result<Reply, ApiError>) {
        match origin {
            Origin::Client(i, conn) => {
                let alive = self.requests[i].state == ReqState::Waiting && self.requests[i].conn == conn;
                if !alive {
                    return;
                }
                let (key, fence) = (self.requests[i].key.clone(), self.requests[i].fence);
                if std::mem::take(&mut self.requests[i].first) {
                    // `api::idempotency::run_first`: a held key is claimed the ordinary way, by
                    // the same request; otherwise the key is completed only if it is this one's.
                    if matches!(result, Err(ApiError::IdempotencyKeyHeld)) {
                        self.note(format!("client: {key} is held; claiming it"));
                        return self.claim_and_send(i);
                    }
                    let (kind, amount) = (self.requests[i].kind, self.requests[i].amount);
                    let fingerprint = format!("{kind:?}:{amount:?}");
                    let payment = self.requests[i].trying.to_string();
                    let ours = {
                        let mut w = lock(&self.w);
                        match completion(&result) {
                            Completion::Stored | Completion::Keep => Ok(true),
                            Completion::Store(status, body) => {
                                match w.idempotency_store_first(&key, &fingerprint, &payment, status, &body) {
                                    Ok(Some((status, body))) => {
                                        // `api::idempotency::run_first`: the key's answer is this
                                        // request's.
                                        drop(w);
                                        return self.done(i, status, body);
                                    }
                                    Ok(None) => Ok(false),
                                    Err(e) => Err(e),
                                }
                            }
                            Completion::Release => {
                                w.idempotency_release_first(&key, &payment).map(|r| r != Released::Held)
                            }
                        }
                    };
                    if matches!(ours, Ok(false)) {
                        self.note(format!("client: {key} is held; claiming it"));
                        return self.claim_and_send(i);
                    }
                } else {
                    let stored = match completion(&result) {
                        Completion::Store(status, body) => lock(&self.w).idempotency_store(&key, fence, status, &body),
                        Completion::Release => lock(&self.w).idempotency_release(&key, fence).map(|_| None),
                        Completion::Stored | Completion::Keep => Ok(None),
                    };
                    if let Ok(Some((status, body))) = stored {
                        // `api::idempotency::run`: the key's first answer is this request's.
                        return self.done(i, status, body);
                    }
                }
                match result {
                    Ok(reply) => self.done(i, reply.status, reply.body),
                    Err(e) if e.is_replayable() => self.done(i, e.status().as_u16(), e.body()),
                    Err(_) => self.retry_later(i),
                }
            }
            Origin::Consumer(serial) => {
                let mut w = lock(&self.w);
                let Some(at) = w.psp.events.iter().position(|d| d.serial == serial) else {
                    return;
                };
                match result {
                    Ok(_) => {
                        w.psp.events.remove(at);
                    }
                    Err(e) => {
                        let d = &mut w.psp.events[at];
                        d.in_flight = false;
                        let (id, delivered) = (d.event.event_id.clone(), d.delivered);
                        w.note(format!("consumer: {id} failed ({}), delivery {delivered}", e.code()));
                        match disposition(delivered, MAX_DELIVER) {
                            Disposition::Redeliver(delay) => {
                                let t = w.now_ms + delay.as_millis() as i64;
                                w.psp.events[at].not_before = t;
                            }
                            Disposition::DeadLetter if !w.calm && w.faults.outages && w.rng.chance(200) => {
                                // Parking failed too: it stays in JetStream, redelivered later.
                                w.note(format!("consumer: could not park {id}; it stays"));
                            }
                            Disposition::DeadLetter => {
                                w.note(format!("consumer: parks {id} as a dead letter"));
                                w.db.dead_letters.push((id, e.code().to_owned()));
                                w.psp.events.remove(at);
                            }
                        }
                    }
                }
            }
            Origin::Sweeper => {}
        }
    }

    /// JetStream delivers one event to its consumer.
    fn deliver_event(&mut self) {
        let (event, serial, delivered) = {
            let mut w = lock(&self.w);
            let now = w.now_ms;
            let free: Vec<usize> = (0..w.psp.events.len())
                .filter(|&i| !w.psp.events[i].in_flight && w.psp.events[i].not_before <= now)
                .collect();
            if free.is_empty() {
                // Nothing due yet: wait for the earliest redelivery.
                if let Some(t) = w.psp.events.iter().filter(|d| !d.in_flight).map(|d| d.not_before).min() {
                    w.now_ms = w.now_ms.max(t);
                }
                return;
            }
            let chaos = w.faults.event_chaos && !w.calm;
            let at = if chaos {
                free[w.rng.below(free.len() as u64) as usize]
            } else {
                free[0]
            };
            if chaos && w.rng.chance(100) {
                // The PSP sends it again (after JetStream's duplicate window).
                let mut again = w.psp.events[at].clone();
                w.ids += 1;
                again.serial = w.ids;
                again.delivered = 0;
                w.psp.events.push(again);
            }
            let d = &mut w.psp.events[at];
            d.delivered += 1;
            d.in_flight = true;
            (d.event.clone(), d.serial, d.delivered)
        };
        let found = {
            let mut w = lock(&self.w);
            w.note(format!(
                "consumer: delivers {} {} (delivery {delivered})",
                event.event_type, event.event_id
            ));
            let down = !w.calm && w.faults.outages && w.now_ms < w.outage_until;
            if down {
                Err(())
            } else {
                // As the consumer's look-up: the payment, and whether the event is recorded.
                let recorded =
                    w.db.processed
                        .contains(&(event.provider.clone(), event.event_id.clone()));
                Ok(w.db
                    .payments
                    .values()
                    .find(|p| p.psp_reference.as_deref() == Some(event.reference.as_str()))
                    .map(|p| (p.id.clone(), recorded)))
            }
        };
        match found {
            Ok(Some((_, true))) => {
                lock(&self.w).note(format!("consumer: LOOKUP found {} recorded already", event.event_id));
                let duplicate = Reply {
                    status: payrail::actors::payment_flow::DUPLICATE_EVENT,
                    body: Vec::new(),
                    stored: false,
                };
                self.finish(Origin::Consumer(serial), Ok(duplicate));
            }
            Ok(Some((payment, false))) => {
                // Unlike payrail's consumer, the simulation may deliver a PSP's resend of an
                // event while the first delivery is still with the actor: the look-up's answer
                // can be stale here, and the store's primary key must catch it.
                let event = PspEvent {
                    unrecorded: true,
                    ..event
                };
                let msg = Msg {
                    op: Op::PspEvent(Arc::new(event)),
                    idem: None,
                    origin: Origin::Consumer(serial),
                    known: None,
                };
                self.deliver(&payment, msg);
            }
            _ => self.finish(Origin::Consumer(serial), Err(ApiError::Unavailable("payment"))),
        }
    }

    /// The PSP answers one call it holds: as the faults allow, it acts or not, and answers or not.
    fn complete_psp_call(&mut self) {
        let mut w = lock(&self.w);
        if w.psp.pending.is_empty() {
            return;
        }
        let at = if w.calm {
            0
        } else {
            let n = w.psp.pending.len() as u64;
            w.rng.below(n) as usize
        };
        let call = w.psp.pending.remove(at);
        let faulty = !w.calm;
        let roll = w.rng.below(100);
        let known = w.psp.by_key.contains_key(call_key(&call.call));
        let answer = if faulty && w.faults.failover && (4..9).contains(&roll) {
            // The connection was refused: the PSP never heard of this call (whether or not an
            // earlier send of the same key reached it).
            Err(PspError::NotSent("connection refused (simulated)".into()))
        } else if faulty && w.faults.psp_refusals && roll < 4 && !known {
            let e = PspError::Invalid {
                code: "processing_error".into(),
                message: "refused by the simulated PSP".into(),
                param: None,
            };
            w.psp.by_key.insert(call_key(&call.call).clone(), Err(e.clone()));
            Err(e)
        } else if faulty && w.faults.psp_timeouts && roll >= 75 {
            if roll < 88 {
                let _ = w.act(&call.call);
                Err(PspError::Unavailable("timed out after acting".into()))
            } else {
                Err(PspError::Unavailable("timed out".into()))
            }
        } else {
            w.act(&call.call)
        };
        w.note(format!(
            "psp: {} -> {:?}",
            describe_call(&call.call),
            answer.as_ref().map(|_| "ok")
        ));
        *call.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
    }

    /// The sweeper: every payment with an attempt open too long gets a Resolve.
    fn sweep(&mut self) {
        let due: Vec<PaymentId> = {
            let w = lock(&self.w);
            let mut due: Vec<PaymentId> =
                w.db.attempts
                    .values()
                    .filter(|a| a.outcome.is_none() && a.started_ms <= w.now_ms - SWEEP_AFTER_MS)
                    .map(|a| a.payment.clone())
                    .collect();
            due.dedup();
            due
        };
        for p in due {
            let queued = self
                .actors
                .iter()
                .any(|a| a.payment == p && a.mailbox.iter().any(|m| matches!(m.origin, Origin::Sweeper)));
            if !queued {
                self.note(format!("sweeper: resolves {p}"));
                self.deliver(
                    &p,
                    Msg {
                        op: Op::Resolve,
                        idem: None,
                        origin: Origin::Sweeper,
                        known: None,
                    },
                );
            }
        }
    }

    /// The process dies: every actor, mailbox and connection is gone; JetStream redelivers.
    fn crash(&mut self) {
        self.note("CRASH: the process dies".into());
        let actors = std::mem::take(&mut self.actors);
        for a in actors {
            let origins = a
                .running
                .map(|(o, _)| o)
                .into_iter()
                .chain(a.mailbox.into_iter().map(|m| m.origin));
            for o in origins {
                match o {
                    Origin::Client(i, conn) => {
                        if self.requests[i].state == ReqState::Waiting && self.requests[i].conn == conn {
                            self.retry_later(i);
                        }
                    }
                    Origin::Consumer(serial) => {
                        let mut w = lock(&self.w);
                        if let Some(d) = w.psp.events.iter_mut().find(|d| d.serial == serial) {
                            d.in_flight = false;
                        }
                    }
                    Origin::Sweeper => {}
                }
            }
        }
    }

    /// A second incarnation starts while the first still runs a message.
    fn split(&mut self) {
        let busy: Vec<usize> = (0..self.actors.len())
            .filter(|&i| self.actors[i].running.is_some() && !self.actors[i].zombie)
            .collect();
        if busy.is_empty() {
            return;
        }
        let i = busy[self.rng(busy.len() as u64) as usize];
        self.note(format!("SPLIT: a second incarnation of {}", self.actors[i].payment));
        self.actors[i].zombie = true;
        let mailbox = std::mem::take(&mut self.actors[i].mailbox);
        let payment = self.actors[i].payment.clone();
        self.actors.push(Incarnation {
            payment,
            live: None,
            mailbox,
            running: None,
            zombie: false,
        });
    }

    /// What the PSP does on its own: settle a pending refund, open or close a dispute.
    fn psp_on_its_own(&mut self) {
        let mut w = lock(&self.w);
        let refs: Vec<String> = w.psp.intents.keys().cloned().collect();
        if refs.is_empty() {
            return;
        }
        let reference = refs[w.rng.below(refs.len() as u64) as usize].clone();
        let pending = w.psp.intents[&reference]
            .refunds
            .iter()
            .position(|r| r.3 == PspRefundStatus::Pending);
        if let Some(at) = pending {
            let ok = w.rng.chance(800);
            let intent = w.psp.intents.get_mut(&reference).expect("intent");
            intent.refunds[at].3 = if ok {
                PspRefundStatus::Succeeded
            } else {
                PspRefundStatus::Failed
            };
            w.announce_refunds(&reference);
            return;
        }
        if !w.faults.disputes || w.calm {
            return;
        }
        let i = w.psp.intents[&reference].clone();
        let open = i.disputes.iter().position(|d| d.2);
        match open {
            Some(at) => {
                let won = w.rng.chance(500);
                let (id, amount, _) = i.disputes[at].clone();
                w.psp.intents.get_mut(&reference).expect("intent").disputes[at].2 = false;
                let status = if won { "won" } else { "lost" };
                let object = serde_json::json!({ "id": id, "object": "dispute", "amount": amount, "currency": "eur",
                                                  "payment_intent": reference, "status": status });
                w.emit("charge.dispute.closed", &reference, object);
            }
            None if matches!(i.status, IntentStatus::Succeeded { .. }) && i.disputes.is_empty() => {
                // Some PSPs dispute the whole charge even after partial refunds.
                let amount = if w.rng.chance(500) {
                    i.captured
                } else {
                    i.captured - i.refunded()
                };
                if amount <= 0 {
                    return;
                }
                w.psp.next += 1;
                let id = format!("du_{}", w.psp.next);
                w.psp
                    .intents
                    .get_mut(&reference)
                    .expect("intent")
                    .disputes
                    .push((id.clone(), amount, true));
                let object = serde_json::json!({ "id": id, "object": "dispute", "amount": amount, "currency": "eur",
                                                  "payment_intent": reference, "reason": "fraudulent",
                                                  "status": "needs_response" });
                w.emit("charge.dispute.created", &reference, object);
            }
            None => {}
        }
    }

    fn tick(&mut self, up_to: u64) {
        let ms = self.rng(up_to) as i64;
        lock(&self.w).now_ms += ms;
    }

    /// The random phase: the RNG picks every next move.
    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            let faults = lock(&self.w).faults;
            let sendable = self.sendable();
            let waiting: Vec<usize> = (0..self.requests.len())
                .filter(|&i| self.requests[i].state == ReqState::Waiting)
                .collect();
            let runnable = self.runnable();
            let (pending_calls, events) = {
                let w = lock(&self.w);
                (
                    w.psp.pending.len(),
                    w.psp.events.iter().filter(|d| !d.in_flight).count(),
                )
            };
            let mut moves: Vec<(u64, u8)> = vec![(3, 0)];
            if !sendable.is_empty() {
                moves.push((4, 1));
            }
            if faults.lease_expiry && !waiting.is_empty() {
                moves.push((1, 2));
            }
            if !runnable.is_empty() {
                moves.push((8, 3));
            }
            if pending_calls > 0 {
                moves.push((3, 4));
            }
            if events > 0 {
                moves.push((3, 5));
            }
            moves.push((1, 6));
            moves.push((1, 7));
            if faults.crashes {
                moves.push((1, 8));
            }
            if faults.split_incarnations {
                moves.push((1, 9));
            }
            let total: u64 = moves.iter().map(|m| m.0).sum();
            let mut pick = self.rng(total);
            let mut chosen = 0;
            for (weight, m) in &moves {
                if pick < *weight {
                    chosen = *m;
                    break;
                }
                pick -= weight;
            }
            match chosen {
                0 => self.tick(400),
                1 => {
                    let i = sendable[self.rng(sendable.len() as u64) as usize];
                    self.send(i);
                }
                2 => {
                    // The client gives up waiting; it will retry with the same key.
                    let i = waiting[self.rng(waiting.len() as u64) as usize];
                    self.note(format!("client: gives up on {}", self.requests[i].key));
                    self.retry_later(i);
                }
                3 => {
                    let i = runnable[self.rng(runnable.len() as u64) as usize];
                    self.step_actor(i);
                }
                4 => self.complete_psp_call(),
                5 => self.deliver_event(),
                6 => self.sweep(),
                7 => self.psp_on_its_own(),
                8 => {
                    if self.chance(100) {
                        self.crash();
                    }
                }
                9 => {
                    if self.chance(300) {
                        self.split();
                    }
                }
                _ => unreachable!(),
            }
        }
    }

    /// No more faults: everything in flight finishes, every client gets an answer, every event
    /// is delivered, every open attempt is resolved. Bounded: not settling is a failure.
    fn drain(&mut self) -> Result<(), String> {
        lock(&self.w).calm = true;
        for _ in 0..20_000 {
            if !lock(&self.w).psp.pending.is_empty() {
                self.complete_psp_call();
                continue;
            }
            let runnable = self.runnable();
            if let Some(&i) = runnable.first() {
                self.step_actor(i);
                continue;
            }
            let waiting = self.requests.iter().any(|r| r.state == ReqState::Waiting);
            if waiting {
                return Err("a client waits for an answer that no actor will give".into());
            }
            if let Some(&i) = self.sendable().first() {
                lock(&self.w).now_ms += LEASE_MS + 1;
                self.send(i);
                continue;
            }
            let (events, pending_refunds, open) = {
                let w = lock(&self.w);
                (
                    !w.psp.events.is_empty(),
                    w.psp
                        .intents
                        .values()
                        .any(|i| i.refunds.iter().any(|r| r.3 == PspRefundStatus::Pending)),
                    w.db.attempts.values().any(|a| a.outcome.is_none()),
                )
            };
            if open {
                // Time passes between redeliveries; the sweeper's tick comes first.
                lock(&self.w).now_ms += SWEEP_AFTER_MS + 1;
                self.sweep();
                continue;
            }
            if events {
                self.deliver_event();
                continue;
            }
            if pending_refunds {
                self.psp_on_its_own();
                continue;
            }
            return Ok(());
        }
        Err("the run did not settle within 20,000 moves".into())
    }

    /// The invariants of docs/DESIGN.md, against the PSP's own truth.
    fn check(&self) -> Vec<String> {
        let w = lock(&self.w);
        let mut bad = Vec::new();
        for v in &w.check_violations {
            bad.push(format!("the flow tried a write the database refuses: {v}"));
        }
        // What the PSP did with an attempt: whether it authorized (or charged) with it.
        let authorized = |a: &payrail::domain::AttemptId| {
            w.psp.acted.contains(a)
                && matches!(
                    w.psp.by_key.get(a),
                    Some(Ok(Answer::Intent(i))) if !matches!(i.status, IntentStatus::Failed(_))
                )
        };
        // A create is never answered "no such payment": one whose payment did not land answers a
        // 5xx, and its retry creates it.
        for r in self.requests.iter().filter(|r| matches!(r.kind, Kind::Create(_))) {
            if let Some((404, _)) = r.answer {
                bad.push(format!("key {} (a create) was answered 404", r.key));
            }
        }
        // A create's key stores one payment at most, whichever id each of its tries drew.
        for r in self.requests.iter().filter(|r| matches!(r.kind, Kind::Create(_))) {
            let retry = format!("{}r", r.base);
            let stored: Vec<_> =
                w.db.payments
                    .keys()
                    .filter(|id| **id == r.base || id.as_str().starts_with(&retry))
                    .collect();
            if stored.len() > 1 {
                bad.push(format!("key {} created {} payments: {stored:?}", r.key, stored.len()));
            }
        }
        // No key produces two effects. A key may start more than one attempt only for an
        // authorization that failed over or reached no PSP: then every attempt but its last
        // ended `unreachable` (the PSP never acted on it), `failed` (a soft decline) or
        // `rejected` (refused: nothing happened), and at most one authorized.
        for r in &self.requests {
            let mut attempts: Vec<_> =
                w.db.attempts
                    .values()
                    .filter(|a| a.attempt.idem_key.as_deref() == Some(r.key.as_str()))
                    .collect();
            attempts.sort_by_key(|a| a.seq);
            if attempts.len() > 1 {
                let acted = attempts.iter().filter(|a| w.psp.acted.contains(&a.attempt.id)).count();
                let effects = attempts.iter().filter(|a| authorized(&a.attempt.id)).count();
                let failed_over = attempts
                    .iter()
                    .all(|a| a.attempt.op == payrail::domain::PspOp::Authorize)
                    && attempts[..attempts.len() - 1].iter().all(|a| match a.outcome {
                        Some(AttemptOutcome::Unreachable) => !w.psp.acted.contains(&a.attempt.id),
                        Some(AttemptOutcome::Failed) => !authorized(&a.attempt.id),
                        // Refused by the PSP: nothing happened there (a retry of a key whose
                        // authorization reached no PSP runs again, and may meet a refusal).
                        Some(AttemptOutcome::Rejected) => !w.psp.acted.contains(&a.attempt.id),
                        _ => false,
                    });
                if !failed_over || effects > 1 {
                    let outcomes: Vec<_> = attempts.iter().map(|a| (a.attempt.id.to_string(), a.outcome)).collect();
                    bad.push(format!(
                        "key {} ({:?}) started {} PSP attempts, {acted} of which the PSP acted on ({effects} authorized): {outcomes:?}",
                        r.key,
                        r.kind,
                        attempts.len()
                    ));
                }
            }
            // A 2xx answer names something durable.
            if let Some((status, body)) = &r.answer {
                if (200..300).contains(status) && r.kind == Kind::Refund {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    let id = v["refund_id"].as_str().unwrap_or_default();
                    if !w.db.refunds.keys().any(|k| k.as_str() == id) {
                        bad.push(format!(
                            "key {} was answered {status} with refund {id:?}, which is not stored",
                            r.key
                        ));
                    }
                }
            }
        }
        for p in w.db.payments.values() {
            // Whatever the connectors did, a payment is authorized at most once.
            let authorizations = w
                .db
                .attempts
                .values()
                .filter(|a| {
                    a.payment == p.id && a.attempt.op == payrail::domain::PspOp::Authorize && authorized(&a.attempt.id)
                })
                .count();
            if authorizations > 1 {
                bad.push(format!("{}: authorized {authorizations} times", p.id));
            }
            let s = &p.state;
            if !s.amounts_consistent() || !payment_checks(p) {
                bad.push(format!("{} amounts inconsistent: {s:?}", p.id));
            }
            let refunds: i64 =
                w.db.refunds
                    .values()
                    .filter(|r| r.payment_id == p.id && r.status != payrail::domain::RefundStatus::Failed)
                    .map(|r| r.amount.minor)
                    .sum();
            if refunds > s.captured {
                bad.push(format!("{}: refunds {refunds} exceed the capture {}", p.id, s.captured));
            }
            let journal = |kind: JournalKind| -> i64 {
                w.db.journals
                    .iter()
                    .filter(|j| j.payment == p.id && j.kind == kind)
                    .map(|j| j.amount)
                    .sum()
            };
            for (kind, stated) in [(JournalKind::Capture, s.captured), (JournalKind::Refund, s.refunded)] {
                if journal(kind) != stated {
                    bad.push(format!(
                        "{}: {} journals {} but the payment says {stated}",
                        p.id,
                        kind.as_str(),
                        journal(kind)
                    ));
                }
            }
            if journal(JournalKind::DisputeOpened) - journal(JournalKind::DisputeWon) != s.disputed {
                bad.push(format!(
                    "{}: dispute journals disagree with disputed {}",
                    p.id, s.disputed
                ));
            }
            if w.db.attempts.values().any(|a| a.payment == p.id && a.outcome.is_none()) {
                bad.push(format!("{} is stuck with an open PSP attempt", p.id));
            }
            // The store against the PSP's truth.
            if let Some(i) = p.psp_reference.as_ref().and_then(|r| w.psp.intents.get(r)) {
                if s.captured != i.captured {
                    bad.push(format!(
                        "{}: captured {} but the PSP captured {}",
                        p.id, s.captured, i.captured
                    ));
                }
                let excused = w.db.exceptions.iter().any(|(x, _)| x == &p.id) || !w.db.dead_letters.is_empty();
                if s.refunded > i.refunded() || (!excused && s.refunded != i.refunded()) {
                    bad.push(format!(
                        "{}: refunded {} but the PSP refunded {}",
                        p.id,
                        s.refunded,
                        i.refunded()
                    ));
                }
            }
        }
        // Every event the PSP sent was applied once, or is visible as a dead letter.
        for id in w.psp.sent.keys() {
            let applied = w.db.processed.iter().any(|(_, e)| e == id);
            let parked = w.db.dead_letters.iter().any(|(e, _)| e == id);
            if !applied && !parked {
                bad.push(format!("PSP event {id} was never applied nor parked"));
            }
        }
        bad
    }
}

fn call_key(c: &Call) -> &payrail::domain::AttemptId {
    match c {
        Call::Authorize(r) => &r.key,
        Call::Capture { key, .. } | Call::Cancel { key, .. } | Call::Refund { key, .. } => key,
    }
}

/// What the runs did, summed: proof that the seeds reach the paths that matter.
#[derive(Default)]
struct Coverage {
    answered_2xx: u64,
    answered_4xx: u64,
    psp_effects: u64,
    refunds_succeeded: u64,
    disputes: u64,
    events_applied: u64,
    dead_letters: u64,
    exceptions: u64,
    crashes: u64,
    splits: u64,
    ambiguous: u64,
    takeovers: u64,
    duplicates_at_lookup: u64,
    duplicates_at_key: u64,
    failed_over_unreachable: u64,
    failed_over_soft: u64,
}

impl Coverage {
    fn add(&mut self, sim: &Sim) {
        let w = lock(&sim.w);
        for r in &sim.requests {
            match r.answer.as_ref().map(|a| a.0) {
                Some(200..=299) => self.answered_2xx += 1,
                Some(400..=499) => self.answered_4xx += 1,
                _ => {}
            }
        }
        self.psp_effects += w.psp.acted.len() as u64;
        // Attempts closed so that another connector could take the payment.
        let next_of = |a: &AttemptRow| {
            w.db.attempts
                .values()
                .any(|b| b.payment == a.payment && b.seq > a.seq && b.attempt.idem_key == a.attempt.idem_key)
        };
        for a in w.db.attempts.values() {
            match a.outcome {
                Some(AttemptOutcome::Unreachable) if next_of(a) => self.failed_over_unreachable += 1,
                Some(AttemptOutcome::Failed) if a.attempt.op == payrail::domain::PspOp::Authorize && next_of(a) => {
                    self.failed_over_soft += 1
                }
                _ => {}
            }
        }
        self.refunds_succeeded +=
            w.db.refunds
                .values()
                .filter(|r| r.status == payrail::domain::RefundStatus::Succeeded)
                .count() as u64;
        self.disputes += w.db.disputes.len() as u64;
        self.events_applied += w.db.processed.len() as u64;
        self.dead_letters += w.db.dead_letters.len() as u64;
        self.exceptions += w.db.exceptions.len() as u64;
        if std::env::var_os("SIM_DEBUG").is_some() {
            for (_, x) in &w.db.exceptions {
                println!("EXC {x}");
            }
            for (id, why) in &w.db.dead_letters {
                let t = w.psp.sent.get(id).map(|e| e.event_type.clone()).unwrap_or_default();
                println!("DL {t} {why}");
            }
        }
        let count = |p: &str| w.trace.iter().filter(|l| l.starts_with(p) || l.contains(p)).count() as u64;
        self.crashes += count("CRASH");
        self.splits += count("SPLIT");
        self.ambiguous += count("landed, reported failed");
        self.duplicates_at_lookup += count("LOOKUP found");
        self.duplicates_at_key += count("KEY refused a second record");
        self.takeovers +=
            w.db.idempotency
                .values()
                .map(|r| (r.fence - 1).max(0) as u64)
                .sum::<u64>();
    }
}

/// Runs one seed; the violations found, with the trace's tail.
fn run_seed(seed: u64, faults: Faults, steps: usize, verbose: bool, cover: &mut Coverage) -> Result<(), String> {
    let mut sim = Sim::new(seed, faults, verbose);
    sim.run(steps);
    let drained = sim.drain();
    cover.add(&sim);
    let mut bad = sim.check();
    if let Err(e) = drained {
        bad.insert(0, e);
    }
    if bad.is_empty() {
        return Ok(());
    }
    let w = lock(&sim.w);
    let tail: Vec<&String> = w
        .trace
        .iter()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "{}\n  last moves:\n{}",
        bad.join("\n  "),
        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    ))
}

struct Args {
    seeds: u64,
    start: u64,
    seed: Option<u64>,
    faults: Faults,
    steps: usize,
    verbose: bool,
    /// Stop at the first failing seed and say how many it took.
    first: bool,
}

fn args() -> Args {
    let mut a = Args {
        seeds: 300,
        start: 0,
        seed: None,
        faults: Faults::all(),
        steps: STEPS,
        verbose: false,
        first: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--seeds" => a.seeds = value().parse().expect("--seeds N"),
            "--start" => a.start = value().parse().expect("--start N"),
            "--seed" => a.seed = Some(value().parse().expect("--seed N")),
            "--steps" => a.steps = value().parse().expect("--steps N"),
            "--faults" => a.faults = Faults::parse(&value()).expect("--faults a,b (see world.rs, Faults)"),
            "--verbose" => a.verbose = true,
            "--first" => a.first = true,
            // Flags cargo's harness would take (a filter, --nocapture …) mean nothing here.
            _ => {}
        }
    }
    a
}

fn main() {
    let a = args();
    if let Some(seed) = a.seed {
        match run_seed(seed, a.faults, a.steps, a.verbose, &mut Coverage::default()) {
            Ok(()) => println!("seed {seed}: ok\n1 passed, 0 failed"),
            Err(e) => {
                println!("seed {seed} FAILED:\n  {e}\n0 passed, 1 failed");
                std::process::exit(1);
            }
        }
        return;
    }
    let started = std::time::Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    // The scripted regressions first: each is one interleaving that lost or doubled money.
    for (name, scenario) in scenarios::ALL {
        let outcome = std::panic::catch_unwind(scenario).unwrap_or_else(|_| Err("it panicked".into()));
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("scenario {name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("scenario {name} ... FAILED: {e}");
            }
        }
    }
    let mut c = Coverage::default();
    for seed in a.start..a.start + a.seeds {
        match run_seed(seed, a.faults, a.steps, false, &mut c) {
            Ok(()) => passed += 1,
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    println!("seed {seed} FAILED (replay: --seed {seed} --verbose):\n  {e}");
                }
                if a.first {
                    println!("first failure after {} seeds", seed - a.start + 1);
                    break;
                }
            }
        }
    }
    println!(
        "simulation: {} scenarios and {} seeds of {} moves in {:.1} s",
        scenarios::ALL.len(),
        a.seeds,
        a.steps,
        started.elapsed().as_secs_f64()
    );
    println!(
        "coverage: {} answers 2xx, {} 4xx; {} PSP effects, {} refunds succeeded, {} disputes; {} events applied, \
         {} dead letters, {} exceptions; {} crashes, {} split incarnations, {} ambiguous commits, {} key takeovers; \
         failovers: {} unreachable, {} soft declines; events seen again: {} at the look-up, {} by processed_events' key",
        c.answered_2xx,
        c.answered_4xx,
        c.psp_effects,
        c.refunds_succeeded,
        c.disputes,
        c.events_applied,
        c.dead_letters,
        c.exceptions,
        c.crashes,
        c.splits,
        c.ambiguous,
        c.takeovers,
        c.failed_over_unreachable,
        c.failed_over_soft,
        c.duplicates_at_lookup,
        c.duplicates_at_key
    );
    // The default run reaches both layers of the PSP-event dedupe: a repeat seen by the
    // consumer's look-up, and a resend that slipped past it refused by the primary key.
    let default_run = a.faults == Faults::all() && !a.first && a.seeds >= 100;
    if default_run && (c.duplicates_at_lookup == 0 || c.duplicates_at_key == 0) {
        failed += 1;
        println!("coverage FAILED: the seeds no longer reach both layers of the PSP-event dedupe");
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Two connectors over the one simulated PSP (as the embedded sandbox's connectors share it):
/// a payment's authorization goes to one first and may fail over to the other.
struct SimConnectors {
    a: Arc<payrail::adapters::psp::connector::Connector>,
    b: Arc<payrail::adapters::psp::connector::Connector>,
}

impl SimConnectors {
    fn new(psp: Arc<SimPsp>) -> SimConnectors {
        use payrail::adapters::psp::connector::Connector;
        use payrail::domain::routing::BreakerConfig;
        SimConnectors {
            a: Arc::new(Connector::new(
                "mca_a".into(),
                "sandbox",
                psp.clone(),
                BreakerConfig::never(),
            )),
            b: Arc::new(Connector::new("mca_b".into(), "sandbox", psp, BreakerConfig::never())),
        }
    }
}

impl payrail::adapters::psp::connector::Connectors for SimConnectors {
    fn route<'a>(
        &'a self,
        payment: &'a Payment,
    ) -> payrail::actors::store::StoreFuture<'a, Option<payrail::domain::routing::Decision>> {
        let (first, second) = match payrail::domain::ids::stable_hash(payment.id.as_str()) % 2 {
            0 => (&self.a, &self.b),
            _ => (&self.b, &self.a),
        };
        let d = payrail::domain::routing::Decision {
            connectors: vec![first.id.clone(), second.id.clone()],
            rule: "default".into(),
        };
        Box::pin(std::future::ready(Ok(Some(d))))
    }

    fn get<'a>(
        &'a self,
        _merchant: &'a MerchantId,
        id: Option<&'a str>,
    ) -> payrail::actors::store::StoreFuture<'a, Option<Arc<payrail::adapters::psp::connector::Connector>>> {
        let c = match id {
            Some("mca_b") => self.b.clone(),
            _ => self.a.clone(),
        };
        Box::pin(std::future::ready(Ok(Some(c))))
    }

    fn soft_decline(&self, f: &payrail::domain::Failure) -> bool {
        f.decline_code.as_deref() == Some("processing_error")
    }
}
