//! The simulated world: an in-memory store that mirrors PostgreSQL's constraints, a PSP that
//! acts by idempotency key and sends events, a clock and an id source. Every fault is drawn
//! from the one seeded RNG, so a seed replays exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use payrail::actors::payment_flow::Live;
use payrail::actors::store::{Clock, CommitFuture, PaymentStore, StoreFuture};
use payrail::adapters::nats::PspEvent;
use payrail::adapters::postgres::commit::{AttemptOutcome, Commit, CommitError};
use payrail::adapters::postgres::idempotency::{Begin, Released};
use payrail::adapters::postgres::payments::Attempt;
use payrail::adapters::postgres::StoreError;
use payrail::adapters::psp::{
    AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspFuture, PspRefund, PspRefundStatus,
};
use payrail::api::error::ApiError;
use payrail::domain::ledger::is_balanced;
use payrail::domain::{
    AttemptId, CaptureStrategy, Dispute, Failure, JournalKind, Money, Payment, PaymentId, Refund, RefundId,
};

/// SplitMix64: small, fast, and the same on every platform and crate version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 0 to n − 1.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `per_mille` times in a thousand.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Which faults a run injects. A regression hunt turns on one class at a time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Clients give up and retry after the key's lease ran out.
    pub lease_expiry: bool,
    /// A commit lands but reports failure.
    pub ambiguous_commits: bool,
    /// The store refuses calls for a while.
    pub outages: bool,
    /// A second incarnation of a payment's actor starts while the first still works (a lost
    /// write race for one of them).
    pub split_incarnations: bool,
    /// The whole process dies: actors, mailboxes and in-flight calls are gone.
    pub crashes: bool,
    /// The PSP acts and then times out, or times out without acting.
    pub psp_timeouts: bool,
    /// The PSP refuses a request outright.
    pub psp_refusals: bool,
    /// Events come twice, late and out of order.
    pub event_chaos: bool,
    /// Customers dispute captured payments.
    pub disputes: bool,
    /// Two connectors: a call may not reach the PSP at all (it never hears of it), and an
    /// issuer may decline softly; the flow fails authorizations over between them.
    pub failover: bool,
}

impl Faults {
    pub fn all() -> Faults {
        Faults {
            lease_expiry: true,
            ambiguous_commits: true,
            outages: true,
            split_incarnations: true,
            crashes: true,
            psp_timeouts: true,
            psp_refusals: true,
            event_chaos: true,
            disputes: true,
            failover: true,
        }
    }

    pub fn none() -> Faults {
        Faults {
            lease_expiry: false,
            ambiguous_commits: false,
            outages: false,
            split_incarnations: false,
            crashes: false,
            psp_timeouts: false,
            psp_refusals: false,
            event_chaos: false,
            disputes: false,
            failover: false,
        }
    }

    pub fn parse(list: &str) -> Option<Faults> {
        let mut f = Faults::none();
        for name in list.split(',').filter(|s| !s.is_empty()) {
            match name {
                "all" => f = Faults::all(),
                "lease_expiry" => f.lease_expiry = true,
                "ambiguous_commits" => f.ambiguous_commits = true,
                "outages" => f.outages = true,
                "split_incarnations" => f.split_incarnations = true,
                "crashes" => f.crashes = true,
                "psp_timeouts" => f.psp_timeouts = true,
                "psp_refusals" => f.psp_refusals = true,
                "event_chaos" => f.event_chaos = true,
                "disputes" => f.disputes = true,
                "failover" => f.failover = true,
                _ => return None,
            }
        }
        Some(f)
    }
}

#[derive(Clone, Debug)]
pub struct AttemptRow {
    pub attempt: Attempt,
    pub payment: PaymentId,
    pub outcome: Option<AttemptOutcome>,
    pub started_ms: i64,
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub struct IdemRow {
    pub fingerprint: String,
    pub fence: i64,
    pub locked_until: i64,
    pub response: Option<(u16, Vec<u8>)>,
    pub resource_id: Option<String>,
}

#[derive(Clone, Debug)]
pub struct JournalRow {
    pub payment: PaymentId,
    pub kind: JournalKind,
    pub correlation: String,
    pub amount: i64,
}

/// PostgreSQL's tables and constraints, in memory.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub payments: BTreeMap<PaymentId, Payment>,
    pub attempts: BTreeMap<AttemptId, AttemptRow>,
    pub refunds: BTreeMap<RefundId, Refund>,
    pub transitions: HashSet<(PaymentId, i32)>,
    pub journals: Vec<JournalRow>,
    pub processed: HashSet<(String, String)>,
    pub disputes: BTreeMap<String, Dispute>,
    pub idempotency: BTreeMap<String, IdemRow>,
    pub dead_letters: Vec<(String, String)>,
    /// Facts the state machine could not take: (payment, what).
    pub exceptions: Vec<(PaymentId, String)>,
    pub next_seq: u64,
    /// The CHECK constraint the last refused commit broke: the flow must never try that.
    pub check_failed: Option<String>,
}

/// Whether commits check the idempotency key's fence (PostgreSQL's statement does).
const FENCE_CHECKS: bool = true;

/// Why the store refused a commit the way PostgreSQL would.
fn violation(what: &str) -> CommitError {
    tracing::debug!(what, "simulated constraint violation");
    CommitError::Store(StoreError::Broken)
}

impl Tables {
    /// The batch's statements in order, all or nothing (the caller applies it to a copy).
    fn apply(&mut self, c: &Commit, now_ms: i64) -> Result<(), CommitError> {
        let Some(p) = &c.payment else { return Ok(()) };
        // IDEMPOTENCY_CLAIM, first in a batch: a key some row holds fails the commit.
        if let Some((i, claim)) = c.idempotency.as_ref().and_then(|i| Some((i, i.claim.as_ref()?))) {
            if self.idempotency.contains_key(&i.key) {
                return Err(CommitError::KeyHeld);
            }
            self.idempotency.insert(
                i.key.clone(),
                IdemRow {
                    fingerprint: String::from_utf8_lossy(&claim.fingerprint).into_owned(),
                    fence: 1,
                    locked_until: now_ms + claim.lease_ms as i64,
                    response: i.response.clone(),
                    resource_id: i.resource_id.clone(),
                },
            );
        }
        if c.unchanged {
            // PAYMENTS_CHECK: the stored row must still hold this version; nothing is written.
            match self.payments.get(&p.id) {
                Some(stored) if stored.version == p.version => {
                    assert_eq!(
                        stored, p,
                        "an unchanged commit carried a payment that differs from the stored one"
                    );
                }
                _ => return Err(CommitError::Stale),
            }
        } else if p.version == 1 {
            if self.payments.contains_key(&p.id) {
                return Err(violation("payments_pkey"));
            }
        } else {
            match self.payments.get(&p.id) {
                Some(stored) if stored.version == p.version - 1 => {}
                _ => return Err(CommitError::Stale),
            }
        }
        if !payment_checks(p) {
            self.check_failed = Some(format!("payments CHECK refused {} {:?}", p.id, p.state));
            return Err(violation("payments check"));
        }
        if !c.unchanged {
            self.payments.insert(p.id.clone(), p.clone());
        }
        for r in &c.refunds {
            self.refunds.insert(r.id.clone(), r.clone());
        }
        if let Some(t) = &c.transition {
            if !self.transitions.insert((p.id.clone(), t.seq)) {
                return Err(violation("payment_transitions_pkey"));
            }
        }
        if let Some(a) = &c.attempt_started {
            if self.attempts.contains_key(&a.id) {
                return Err(violation("psp_attempts_pkey"));
            }
            self.next_seq += 1;
            self.attempts.insert(
                a.id.clone(),
                AttemptRow {
                    attempt: a.clone(),
                    payment: p.id.clone(),
                    outcome: None,
                    started_ms: now_ms,
                    seq: self.next_seq,
                },
            );
        }
        if let Some((id, outcome)) = &c.attempt_finished {
            if let Some(row) = self.attempts.get_mut(id) {
                if row.outcome.is_none() {
                    row.outcome = Some(*outcome);
                }
            }
        }
        if let Some(j) = &c.journal {
            if !is_balanced(&j.entries) {
                self.check_failed = Some(format!("unbalanced {} journal of {}", j.kind.as_str(), p.id));
                return Err(violation("journal unbalanced"));
            }
            let dup = self
                .journals
                .iter()
                .any(|x| x.payment == p.id && x.kind == j.kind && x.correlation == j.correlation_id);
            if dup {
                return Err(violation("journals natural key"));
            }
            let amount = j.entries.iter().map(|e| e.debit).max().unwrap_or_default();
            self.journals.push(JournalRow {
                payment: p.id.clone(),
                kind: j.kind,
                correlation: j.correlation_id.clone(),
                amount,
            });
        }
        if let Some(i) = c.idempotency.as_ref().filter(|i| i.claim.is_none()) {
            let fenced = FENCE_CHECKS;
            let row = self.idempotency.get_mut(&i.key);
            match row {
                Some(row) if row.response.is_none() && (!fenced || row.fence == i.fence) => {
                    if i.resource_id.is_some() {
                        row.resource_id = i.resource_id.clone();
                    }
                    row.response = i.response.clone();
                }
                _ if fenced => return Err(CommitError::Fenced),
                _ => {}
            }
        }
        if let Some(e) = &c.processed_event {
            if !self.processed.insert((e.provider.clone(), e.event_id.clone())) {
                return Err(violation("processed_events_pkey"));
            }
        }
        for d in &c.disputes {
            let clash = self
                .disputes
                .values()
                .any(|x| x.id != d.id && x.payment_id == d.payment_id && x.psp_reference == d.psp_reference);
            if clash {
                return Err(violation("disputes (payment_id, psp_reference)"));
            }
            self.disputes.insert(d.id.to_string(), d.clone());
        }
        for (payment, what) in &c.exceptions {
            self.exceptions.push((payment.clone(), what.clone()));
        }
        Ok(())
    }
}

/// The payments table's CHECK constraints.
pub fn payment_checks(p: &Payment) -> bool {
    let s = &p.state;
    (0..=s.amount).contains(&s.capturable)
        && (0..=s.amount).contains(&s.captured)
        && s.refunded >= 0
        && s.refund_pending >= 0
        && s.refunded + s.refund_pending <= s.captured
        && s.disputed >= 0
        && s.disputed + s.refunded + s.refund_pending <= s.captured
}

/// One PSP intent as the PSP knows it: the truth the store is checked against.
#[derive(Clone, Debug)]
pub struct PspIntent {
    pub amount: i64,
    pub status: IntentStatus,
    pub captured: i64,
    /// (refund reference, attempt id, amount, status)
    pub refunds: Vec<(String, AttemptId, i64, PspRefundStatus)>,
    /// (dispute reference, amount, open)
    pub disputes: Vec<(String, i64, bool)>,
}

impl PspIntent {
    pub fn refunded(&self) -> i64 {
        self.refunds
            .iter()
            .filter(|r| r.3 == PspRefundStatus::Succeeded)
            .map(|r| r.2)
            .sum()
    }

    fn refund_holds(&self) -> i64 {
        self.refunds
            .iter()
            .filter(|r| r.3 != PspRefundStatus::Failed)
            .map(|r| r.2)
            .sum()
    }
}

#[derive(Clone, Debug)]
pub enum Answer {
    Intent(Intent),
    Refund(PspRefund),
}

#[derive(Clone, Debug)]
pub enum Call {
    Authorize(AuthorizeRequest),
    Capture {
        key: AttemptId,
        reference: String,
        amount: i64,
    },
    Cancel {
        key: AttemptId,
        reference: String,
    },
    Refund {
        key: AttemptId,
        reference: String,
        amount: i64,
    },
}

impl Call {
    fn key(&self) -> &AttemptId {
        match self {
            Call::Authorize(r) => &r.key,
            Call::Capture { key, .. } | Call::Cancel { key, .. } | Call::Refund { key, .. } => key,
        }
    }
}

pub type Slot = Arc<Mutex<Option<Result<Answer, PspError>>>>;

pub struct PendingCall {
    pub call: Call,
    pub slot: Slot,
}

/// An event on its way through JetStream.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub serial: u64,
    pub event: PspEvent,
    pub delivered: i64,
    /// Being handled now (not redelivered meanwhile).
    pub in_flight: bool,
    /// A NAK's delay: not delivered again before this time.
    pub not_before: i64,
}

#[derive(Default)]
pub struct PspWorld {
    pub intents: BTreeMap<String, PspIntent>,
    /// Answers by idempotency key: the same key always gets the same answer, one effect.
    pub by_key: HashMap<AttemptId, Result<Answer, PspError>>,
    /// Attempt ids the PSP acted on (an effect happened).
    pub acted: HashSet<AttemptId>,
    pub pending: Vec<PendingCall>,
    pub events: Vec<Delivery>,
    /// Every event the PSP sent, by id.
    pub sent: BTreeMap<String, PspEvent>,
    pub next: u64,
}

pub struct World {
    pub rng: Rng,
    pub faults: Faults,
    /// No faults: the run is draining to quiescence.
    pub calm: bool,
    pub now_ms: i64,
    pub ids: u64,
    pub db: Tables,
    pub psp: PspWorld,
    /// A store outage lasts until this time.
    pub outage_until: i64,
    pub trace: Vec<String>,
    pub verbose: bool,
    /// CHECK constraints the flow ran into.
    pub check_violations: Vec<String>,
    /// Scripted faults: the next this many commits land and report failure.
    pub force_ambiguous: u32,
    /// Scripted faults: the next this many commits land, their COMMIT goes unanswered, and the
    /// ledger shard writes each again: its second run is the answer. Over `force_ambiguous` when
    /// both are set (a commit alone in its batch is answered as `force_ambiguous` says).
    pub force_rerun: u32,
    /// Scripted faults: counting down, the commit that brings this to 0 does not land and
    /// reports failure (2: the next commit lands, the one after is refused).
    pub refuse_nth: u32,
    /// Scripted faults: counting down, the commit that brings this to 0 lands and reports
    /// failure (2: the next commit is answered, the one after lands unanswered).
    pub ambiguous_nth: u32,
}

pub type Shared = Arc<Mutex<World>>;

pub fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    pub fn new(seed: u64, faults: Faults, verbose: bool) -> World {
        World {
            rng: Rng::new(seed),
            faults,
            calm: false,
            now_ms: 1_000_000,
            ids: 0,
            db: Tables::default(),
            psp: PspWorld::default(),
            outage_until: 0,
            trace: Vec::new(),
            verbose,
            check_violations: Vec::new(),
            force_ambiguous: 0,
            refuse_nth: 0,
            ambiguous_nth: 0,
            force_rerun: 0,
        }
    }

    pub fn note(&mut self, line: String) {
        if self.verbose {
            println!("  [{:>7} ms] {line}", self.now_ms);
        }
        self.trace.push(line);
    }

    fn store_down(&mut self) -> bool {
        if self.calm || !self.faults.outages {
            return false;
        }
        if self.now_ms < self.outage_until {
            return true;
        }
        if self.rng.chance(8) {
            self.outage_until = self.now_ms + 200 + self.rng.below(800) as i64;
            self.note("store: outage begins".into());
            return true;
        }
        false
    }

    /// `INSERT … ON CONFLICT DO NOTHING`, then the lease and takeover rules of the real query.
    pub fn idempotency_begin(&mut self, key: &str, fingerprint: &str, lease_ms: i64) -> Result<Begin, ApiError> {
        if self.store_down() {
            return Err(ApiError::Unavailable("database"));
        }
        let now = self.now_ms;
        let row = self.db.idempotency.entry(key.to_owned()).or_insert_with(|| IdemRow {
            fingerprint: fingerprint.to_owned(),
            fence: 0,
            locked_until: now + lease_ms,
            response: None,
            resource_id: None,
        });
        if row.fence == 0 {
            row.fence = 1;
            return Ok(Begin::Proceed {
                resource_id: None,
                fence: 1,
            });
        }
        if row.fingerprint != fingerprint {
            return Ok(Begin::Mismatch);
        }
        if let Some((status, body)) = &row.response {
            return Ok(Begin::Replay {
                status: *status,
                body: body.clone(),
            });
        }
        if row.locked_until >= now {
            return Ok(Begin::InFlight);
        }
        row.locked_until = now + lease_ms;
        row.fence += 1;
        Ok(Begin::Proceed {
            resource_id: row.resource_id.clone(),
            fence: row.fence,
        })
    }

    /// `Db::idempotency_store`: the answer, unless the key holds one under this fence already
    /// (returned instead).
    pub fn idempotency_store(
        &mut self,
        key: &str,
        fence: i64,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>, ApiError> {
        if self.store_down() {
            return Err(ApiError::Unavailable("database"));
        }
        if let Some(row) = self.db.idempotency.get_mut(key) {
            if !FENCE_CHECKS || row.fence == fence {
                match &row.response {
                    None => row.response = Some((status, body.to_vec())),
                    Some(stored) => return Ok(Some(stored.clone())),
                }
            }
        }
        Ok(None)
    }

    /// `Db::idempotency_store_first`: a new row with the answer, or the answer on the row this
    /// request's first commit inserted (it names `payment`); the key's answer then, or `None` for
    /// another request's row, which stays as it is.
    pub fn idempotency_store_first(
        &mut self,
        key: &str,
        fingerprint: &str,
        payment: &str,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>, ApiError> {
        if self.store_down() {
            return Err(ApiError::Unavailable("database"));
        }
        let now = self.now_ms;
        match self.db.idempotency.get_mut(key) {
            None => {
                self.db.idempotency.insert(
                    key.to_owned(),
                    IdemRow {
                        fingerprint: fingerprint.to_owned(),
                        fence: 1,
                        locked_until: now,
                        response: Some((status, body.to_vec())),
                        resource_id: None,
                    },
                );
                Ok(Some((status, body.to_vec())))
            }
            // The row this request's first commit inserted; an answer that commit stored stays.
            Some(row) if row.fence == 1 && row.resource_id.as_deref() == Some(payment) => Ok(Some(
                row.response.get_or_insert_with(|| (status, body.to_vec())).clone(),
            )),
            Some(_) => Ok(None),
        }
    }

    /// `Db::idempotency_release_first`: frees the row this request's first commit inserted.
    pub fn idempotency_release_first(&mut self, key: &str, payment: &str) -> Result<Released, ApiError> {
        if self.store_down() {
            return Err(ApiError::Unavailable("database"));
        }
        let now = self.now_ms;
        match self.db.idempotency.get_mut(key) {
            Some(row) if row.response.is_none() && row.fence == 1 && row.resource_id.as_deref() == Some(payment) => {
                row.locked_until = now - 1;
                Ok(Released::Ours)
            }
            Some(_) => Ok(Released::Held),
            None => Ok(Released::NoRow),
        }
    }

    pub fn idempotency_release(&mut self, key: &str, fence: i64) -> Result<(), ApiError> {
        if self.store_down() {
            return Err(ApiError::Unavailable("database"));
        }
        let now = self.now_ms;
        if let Some(row) = self.db.idempotency.get_mut(key) {
            if row.response.is_none() && (!FENCE_CHECKS || row.fence == fence) {
                row.locked_until = now - 1;
            }
        }
        Ok(())
    }

    fn commit(&mut self, c: &Commit) -> Result<(), CommitError> {
        if self.store_down() {
            self.note("store: commit refused (outage)".into());
            return Err(StoreError::Unavailable.into());
        }
        if self.refuse_nth > 0 {
            self.refuse_nth -= 1;
            if self.refuse_nth == 0 {
                self.note(format!("store: commit of {} refused (scripted)", describe(c)));
                return Err(StoreError::Unavailable.into());
            }
        }
        let mut copy = self.db.clone();
        let result = copy.apply(c, self.now_ms);
        if let Some(check) = copy.check_failed.take() {
            self.note(format!("store: {check}"));
            self.check_violations.push(check);
        }
        if result.is_ok() {
            self.db = copy;
            let nth = self.ambiguous_nth == 1;
            self.ambiguous_nth = self.ambiguous_nth.saturating_sub(1);
            let forced = self.force_ambiguous > 0 || nth;
            self.force_ambiguous = self.force_ambiguous.saturating_sub(1);
            let rerun_forced = self.force_rerun > 0;
            self.force_rerun = self.force_rerun.saturating_sub(1);
            if forced || rerun_forced || (!self.calm && self.faults.ambiguous_commits && self.rng.chance(40)) {
                // The ledger shard writes a batch whose COMMIT went unanswered again commit by
                // commit (`ledger_shard`): then the commit's own second run is its answer.
                if rerun_forced || (!forced && self.rng.chance(500)) {
                    let mut again = self.db.clone();
                    let second = again.apply(c, self.now_ms);
                    self.note(format!(
                        "store: commit of {} landed, written again -> {:?}",
                        describe(c),
                        second.as_ref().err()
                    ));
                    if second.is_ok() {
                        self.db = again;
                    }
                    return second;
                }
                self.note(format!("store: commit of {} landed, reported failed", describe(c)));
                return Err(StoreError::Unavailable.into());
            }
        }
        if let (Err(CommitError::Store(_)), Some(e)) = (&result, &c.processed_event) {
            if self.db.processed.contains(&(e.provider.clone(), e.event_id.clone())) {
                self.note(format!("store: KEY refused a second record of {}", e.event_id));
            }
        }
        self.note(format!("store: commit {} -> {:?}", describe(c), result.as_ref().err()));
        result
    }

    pub fn fresh(&mut self, prefix: &str) -> String {
        self.ids += 1;
        format!("{prefix}{:012}", self.ids)
    }

    /// Sends an event the way the PSP does, at most once per id.
    pub fn emit(&mut self, event_type: &str, reference: &str, object: Value) {
        let id = self.fresh("evt_");
        let event = PspEvent {
            provider: "sim".into(),
            event_id: id.clone(),
            event_type: event_type.into(),
            reference: reference.into(),
            object: serde_json::to_vec(&object).unwrap_or_default(),
            raw: serde_json::to_vec(&json!({ "id": id, "type": event_type, "data": { "object": object } }))
                .unwrap_or_default(),
            merchant: None,
            unrecorded: false,
        };
        self.note(format!("psp: sends {event_type} {id} for {reference}"));
        self.psp.sent.insert(id, event.clone());
        self.ids += 1;
        let serial = self.ids;
        self.psp.events.push(Delivery {
            serial,
            event,
            delivered: 0,
            in_flight: false,
            not_before: 0,
        });
    }

    /// The PSP performs `call` (once per idempotency key) and says what happened.
    pub fn act(&mut self, call: &Call) -> Result<Answer, PspError> {
        let key = call.key().clone();
        if let Some(known) = self.psp.by_key.get(&key) {
            return known.clone();
        }
        let answer = self.act_once(call);
        if answer.is_ok() {
            self.psp.acted.insert(key.clone());
        }
        self.psp.by_key.insert(key, answer.clone());
        answer
    }

    fn act_once(&mut self, call: &Call) -> Result<Answer, PspError> {
        let refused = |code: &str| PspError::Invalid {
            code: code.into(),
            message: "refused by the simulated PSP".into(),
            param: None,
        };
        match call {
            Call::Authorize(req) => {
                self.psp.next += 1;
                let reference = format!("pi_{}", self.psp.next);
                let declined = self.rng.chance(100);
                let soft = !self.calm && self.faults.failover && self.rng.chance(12);
                let status = if soft {
                    IntentStatus::Failed(Failure {
                        code: "card_declined".into(),
                        decline_code: Some("processing_error".into()),
                        message: "An error occurred while processing the card.".into(),
                    })
                } else if declined {
                    IntentStatus::Failed(Failure {
                        code: "card_declined".into(),
                        decline_code: Some("generic_decline".into()),
                        message: "Your card was declined.".into(),
                    })
                } else if req.capture == CaptureStrategy::Manual {
                    IntentStatus::Authorized {
                        amount: req.amount.minor,
                    }
                } else {
                    IntentStatus::Succeeded {
                        amount_captured: req.amount.minor,
                    }
                };
                let captured = match status {
                    IntentStatus::Succeeded { amount_captured } => amount_captured,
                    _ => 0,
                };
                self.psp.intents.insert(
                    reference.clone(),
                    PspIntent {
                        amount: req.amount.minor,
                        status: status.clone(),
                        captured,
                        refunds: Vec::new(),
                        disputes: Vec::new(),
                    },
                );
                self.announce(&reference);
                Ok(Answer::Intent(self.intent(&reference)))
            }
            Call::Capture { reference, amount, .. } => {
                let Some(i) = self.psp.intents.get_mut(reference) else {
                    return Err(refused("resource_missing"));
                };
                match i.status {
                    IntentStatus::Authorized { amount: held } if *amount <= held => {
                        i.status = IntentStatus::Succeeded {
                            amount_captured: *amount,
                        };
                        i.captured = *amount;
                    }
                    _ => return Err(refused("payment_intent_unexpected_state")),
                }
                self.announce(reference);
                if self.faults.failover && self.rng.chance(250) {
                    // An asynchronous PSP (Adyen): the capture is only "received" in the answer;
                    // its event (just announced) confirms it.
                    let mut received = self.intent(reference);
                    received.status = IntentStatus::CaptureReceived { amount: *amount };
                    return Ok(Answer::Intent(received));
                }
                Ok(Answer::Intent(self.intent(reference)))
            }
            Call::Cancel { reference, .. } => {
                let Some(i) = self.psp.intents.get_mut(reference) else {
                    return Err(refused("resource_missing"));
                };
                match i.status {
                    IntentStatus::Authorized { .. } | IntentStatus::RequiresAction { .. } => {
                        i.status = IntentStatus::Canceled;
                    }
                    _ => return Err(refused("payment_intent_unexpected_state")),
                }
                self.announce(reference);
                Ok(Answer::Intent(self.intent(reference)))
            }
            Call::Refund { key, reference, amount } => {
                let pending = self.rng.chance(300);
                let Some(i) = self.psp.intents.get_mut(reference) else {
                    return Err(refused("resource_missing"));
                };
                if i.captured - i.refund_holds() < *amount {
                    return Err(refused("amount_too_large"));
                }
                self.psp.next += 1;
                let id = format!("re_psp_{}", self.psp.next);
                let status = if pending {
                    PspRefundStatus::Pending
                } else {
                    PspRefundStatus::Succeeded
                };
                i.refunds.push((id.clone(), key.clone(), *amount, status));
                if status == PspRefundStatus::Succeeded {
                    self.announce_refunds(reference);
                }
                Ok(Answer::Refund(PspRefund { reference: id, status }))
            }
        }
    }

    pub fn intent(&self, reference: &str) -> Intent {
        let i = &self.psp.intents[reference];
        Intent {
            reference: reference.to_owned(),
            client_secret: format!("{reference}_secret"),
            status: i.status.clone(),
        }
    }

    fn announce(&mut self, reference: &str) {
        let i = self.psp.intents[reference].clone();
        let base = json!({ "id": reference, "object": "payment_intent", "amount": i.amount, "currency": "eur" });
        match &i.status {
            IntentStatus::Authorized { amount } => {
                let mut o = base;
                o["amount_capturable"] = json!(amount);
                self.emit("payment_intent.amount_capturable_updated", reference, o);
            }
            IntentStatus::Succeeded { amount_captured } => {
                let mut o = base;
                o["amount_received"] = json!(amount_captured);
                self.emit("payment_intent.succeeded", reference, o);
            }
            IntentStatus::Failed(_) => {
                let mut o = base;
                o["last_payment_error"] = json!({ "code": "card_declined", "message": "Your card was declined." });
                self.emit("payment_intent.payment_failed", reference, o);
            }
            IntentStatus::Canceled => self.emit("payment_intent.canceled", reference, base),
            IntentStatus::RequiresAction { .. } | IntentStatus::CaptureReceived { .. } | IntentStatus::Processing => {}
        }
    }

    /// `charge.refunded`, listing every refund of the charge as Stripe does.
    pub fn announce_refunds(&mut self, reference: &str) {
        let i = &self.psp.intents[reference];
        let data: Vec<Value> = i
            .refunds
            .iter()
            .map(|(id, _, amount, status)| {
                let s = match status {
                    PspRefundStatus::Pending => "pending",
                    PspRefundStatus::Succeeded => "succeeded",
                    PspRefundStatus::Failed => "failed",
                };
                json!({ "id": id, "object": "refund", "amount": amount, "currency": "eur", "status": s,
                        "payment_intent": reference })
            })
            .collect();
        let object = json!({ "id": format!("ch_{}", &reference[3..]), "object": "charge", "payment_intent": reference,
                             "amount_refunded": i.refunded(), "currency": "eur", "refunds": { "data": data } });
        self.emit("charge.refunded", reference, object);
    }

    pub fn call_psp(w: &Shared, call: Call) -> Slot {
        let slot: Slot = Arc::new(Mutex::new(None));
        let mut world = lock(w);
        world.note(format!("psp: call {} arrives", describe_call(&call)));
        world.psp.pending.push(PendingCall {
            call,
            slot: slot.clone(),
        });
        slot
    }
}

pub fn describe_call(c: &Call) -> String {
    match c {
        Call::Authorize(r) => format!("authorize {} {}", r.key, r.amount.minor),
        Call::Capture { key, amount, .. } => format!("capture {key} {amount}"),
        Call::Cancel { key, .. } => format!("cancel {key}"),
        Call::Refund { key, amount, .. } => format!("refund {key} {amount}"),
    }
}

fn describe(c: &Commit) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &c.payment {
        parts.push(format!("{} v{} {}", p.id, p.version, p.status().as_str()));
    }
    if let Some(a) = &c.attempt_started {
        parts.push(format!("start {} ({:?})", a.id, a.op));
    }
    if let Some((a, o)) = &c.attempt_finished {
        parts.push(format!("finish {a} {o:?}"));
    }
    if let Some(j) = &c.journal {
        parts.push(format!("journal {}", j.kind.as_str()));
    }
    if let Some(e) = &c.processed_event {
        parts.push(format!("event {}", e.event_id));
    }
    parts.join(", ")
}

/// The store the flow sees: every call reads or writes the world under its lock, at once.
pub struct SimStore(pub Shared);

fn ready<'a, T: 'a>(v: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

impl SimStore {
    fn read<T>(&self, f: impl FnOnce(&Tables) -> T) -> Result<T, StoreError> {
        let mut w = lock(&self.0);
        if w.store_down() {
            return Err(StoreError::Unavailable);
        }
        Ok(f(&w.db))
    }
}

impl PaymentStore for SimStore {
    fn load<'a>(&'a self, id: &'a PaymentId) -> StoreFuture<'a, Option<Live>> {
        ready(self.read(|db| load(db, id)))
    }

    fn commit(&self, commit: Commit) -> CommitFuture<'_> {
        let r = lock(&self.0).commit(&commit);
        Box::pin(std::future::ready(r))
    }

    fn refund<'a>(&'a self, payment: &'a PaymentId, id: &'a RefundId) -> StoreFuture<'a, Option<Refund>> {
        ready(self.read(|db| db.refunds.get(id).filter(|r| &r.payment_id == payment).cloned()))
    }

    fn refunds_by_reference<'a>(
        &'a self,
        payment: &'a PaymentId,
        references: &'a [String],
    ) -> StoreFuture<'a, Vec<Refund>> {
        ready(self.read(|db| {
            let mut list: Vec<Refund> = db
                .refunds
                .values()
                .filter(|r| &r.payment_id == payment)
                .filter(|r| {
                    r.psp_reference
                        .as_ref()
                        .map(|x| references.contains(x))
                        .unwrap_or(false)
                })
                .cloned()
                .collect();
            list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            list
        }))
    }

    fn attempt_by_key<'a>(
        &'a self,
        payment: &'a PaymentId,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Attempt, Option<AttemptOutcome>)>> {
        ready(self.read(|db| {
            db.attempts
                .values()
                .filter(|a| &a.payment == payment && a.attempt.idem_key.as_deref() == Some(key))
                .min_by_key(|a| a.seq)
                .map(|a| (a.attempt.clone(), a.outcome))
        }))
    }

    fn event_processed<'a>(&'a self, provider: &'a str, event_id: &'a str) -> StoreFuture<'a, bool> {
        ready(self.read(|db| db.processed.contains(&(provider.to_owned(), event_id.to_owned()))))
    }

    fn dispute<'a>(&'a self, payment: &'a PaymentId, reference: &'a str) -> StoreFuture<'a, Option<Dispute>> {
        ready(self.read(|db| {
            db.disputes
                .values()
                .find(|d| &d.payment_id == payment && d.psp_reference == reference)
                .cloned()
        }))
    }
}

pub fn load(db: &Tables, id: &PaymentId) -> Option<Live> {
    let payment = db.payments.get(id)?.clone();
    let mut open: Vec<&AttemptRow> = db
        .attempts
        .values()
        .filter(|a| &a.payment == id && a.outcome.is_none())
        .collect();
    open.sort_by_key(|a| a.seq);
    Some(Live {
        payment,
        open: open.into_iter().map(|a| a.attempt.clone()).collect(),
    })
}

/// The simulated clock and ids.
pub struct SimClock(pub Shared);

impl Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        let ms = lock(&self.0).now_ms;
        DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap_or_default()
    }

    fn unique(&self) -> String {
        let mut w = lock(&self.0);
        w.ids += 1;
        format!("{:020}", w.ids)
    }
}

/// The PSP the flow sees: each call waits until the scheduler decides what the PSP does.
pub struct SimPsp(pub Shared);

struct Pending<T> {
    slot: Slot,
    pick: fn(Answer) -> Option<T>,
}

impl<T> Future for Pending<T> {
    type Output = Result<T, PspError>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            None => Poll::Pending,
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(a)) => Poll::Ready((self.pick)(a).ok_or_else(|| PspError::Unavailable("wrong answer kind".into()))),
        }
    }
}

fn intent_of(a: Answer) -> Option<Intent> {
    match a {
        Answer::Intent(i) => Some(i),
        Answer::Refund(_) => None,
    }
}

fn refund_of(a: Answer) -> Option<PspRefund> {
    match a {
        Answer::Refund(r) => Some(r),
        Answer::Intent(_) => None,
    }
}

impl Psp for SimPsp {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent> {
        let slot = World::call_psp(&self.0, Call::Authorize(req));
        Box::pin(Pending { slot, pick: intent_of })
    }

    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent> {
        let slot = World::call_psp(
            &self.0,
            Call::Capture {
                key,
                reference,
                amount: amount.minor,
            },
        );
        Box::pin(Pending { slot, pick: intent_of })
    }

    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent> {
        let slot = World::call_psp(&self.0, Call::Cancel { key, reference });
        Box::pin(Pending { slot, pick: intent_of })
    }

    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund> {
        let slot = World::call_psp(
            &self.0,
            Call::Refund {
                key,
                reference,
                amount: amount.minor,
            },
        );
        Box::pin(Pending { slot, pick: refund_of })
    }

    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent> {
        let w = lock(&self.0);
        let r = if w.psp.intents.contains_key(&reference) {
            Ok(w.intent(&reference))
        } else {
            Err(PspError::Invalid {
                code: "resource_missing".into(),
                message: "No such payment intent.".into(),
                param: None,
            })
        };
        Box::pin(std::future::ready(r))
    }
}
