//! Scripted regression scenarios: each replays, move by move, an interleaving that lost or
//! doubled money, or left a request stuck, before its fix (docs/RELIABILITY.md, "Findings and
//! their fixes"). They run before the random seeds, in the same world, against the same
//! invariants.

use payrail::adapters::psp::{PspError, PspRefundStatus};
use payrail::domain::{DisputeStatus, PaymentId, RefundStatus, Status};
use serde_json::json;

use super::*;

/// What the PSP does with the call it holds.
#[derive(Clone, Copy, Debug)]
pub enum Psp {
    Act,
    /// Times out without acting.
    Timeout,
    /// Refuses the request: nothing happens there.
    Refuse,
    /// The PSP acts, and its answer is lost (a timeout after acting).
    ActThenTimeout,
}

/// A risk check that holds every payment for review.
struct AlwaysReview;

impl payrail::actors::risk::RiskCheck for AlwaysReview {
    fn assess<'a>(
        &'a self,
        _: &'a payrail::domain::Payment,
        _: Option<&'a payrail::domain::risk::CardSignals>,
    ) -> payrail::actors::store::StoreFuture<'a, payrail::domain::risk::RiskDecision> {
        Box::pin(std::future::ready(Ok(payrail::domain::risk::RiskDecision {
            score: 0,
            outcome: payrail::domain::risk::RiskAction::Review,
            rule: Some("rr_sim_review".into()),
        })))
    }
}

impl Sim {
    fn scripted() -> Sim {
        Sim::bare(0, Faults::none(), std::env::var_os("SIM_VERBOSE").is_some())
    }

    /// The oldest call the PSP holds gets `mode`.
    fn psp(&mut self, mode: Psp) {
        self.psp_at(0, mode)
    }

    /// The call at `at` (0: the oldest) gets `mode`.
    fn psp_at(&mut self, at: usize, mode: Psp) {
        let mut w = lock(&self.w);
        if w.psp.pending.len() <= at {
            w.note(format!("psp (scripted {mode:?}): no call is waiting"));
            return;
        }
        let call = w.psp.pending.remove(at);
        let answer = match mode {
            Psp::Act => w.act(&call.call),
            Psp::Timeout => Err(PspError::Unavailable("timed out".into())),
            Psp::ActThenTimeout => {
                let _ = w.act(&call.call);
                Err(PspError::Unavailable("timed out after acting".into()))
            }
            Psp::Refuse => {
                let e = PspError::Invalid {
                    code: "processing_error".into(),
                    message: "refused".into(),
                    param: None,
                };
                w.psp.by_key.insert(call_key(&call.call).clone(), Err(e.clone()));
                Err(e)
            }
        };
        w.note(format!("psp (scripted {mode:?}): {}", describe_call(&call.call)));
        *call.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
    }

    /// The oldest call, a refund, is taken by the PSP as pending: its outcome comes by event.
    fn psp_refund_pending(&mut self) {
        let mut w = lock(&self.w);
        let call = w.psp.pending.remove(0);
        let Call::Refund { key, reference, amount } = &call.call else {
            panic!("the oldest PSP call is not a refund")
        };
        w.psp.next += 1;
        let id = format!("re_psp_{}", w.psp.next);
        let intent = w.psp.intents.get_mut(reference).expect("intent");
        intent
            .refunds
            .push((id.clone(), key.clone(), *amount, PspRefundStatus::Pending));
        let answer = Ok(Answer::Refund(payrail::adapters::psp::PspRefund {
            reference: id,
            status: PspRefundStatus::Pending,
        }));
        w.psp.acted.insert(key.clone());
        w.psp.by_key.insert(key.clone(), answer.clone());
        *call.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
    }

    /// A risk check that holds every payment for review.
    fn hold_every_payment_for_review(&mut self) {
        self.deps = Arc::new(PaymentDeps {
            store: Arc::new(SimStore(self.w.clone())),
            psp: Arc::new(SimPsp(self.w.clone())),
            connectors: Arc::new(payrail::adapters::psp::connector::OneConnector::new(Arc::new(SimPsp(
                self.w.clone(),
            )))),
            psp_timeout: None,
            clock: Arc::new(SimClock(self.w.clone())),
            risk: Arc::new(AlwaysReview),
            metrics: Arc::new(payrail::metrics::Metrics::default()),
            landing: Default::default(),
        });
    }

    /// A payment of 1,000 with automatic capture, every payment held for review, confirmed; the
    /// PSP answers its authorization with `mode`. Its id and the confirm's request.
    fn confirmed_under_review(&mut self, mode: Psp) -> (PaymentId, usize) {
        self.hold_every_payment_for_review();
        let p = self.add_payment(1000, false);
        let confirm = self.request(&p, Kind::Confirm, None);
        lock(&self.w).rng = Rng::new(1); // no decline
        self.send(confirm);
        self.run_actors();
        self.psp(mode);
        self.run_actors();
        (p, confirm)
    }

    /// Refunds of `p` of each amount, each taken by the PSP as pending.
    fn refunds_pending_at_the_psp(&mut self, p: &PaymentId, amounts: &[i64]) {
        for &amount in amounts {
            let r = self.request(p, Kind::Refund, Some(amount));
            self.send(r);
            self.run_actors();
            self.psp_refund_pending();
            self.run_actors();
        }
    }

    /// Every actor moves until none can (each waits for the PSP, or has nothing to do).
    fn run_actors(&mut self) {
        self.run_actors_in(false)
    }

    /// The same, the newest incarnation first.
    fn run_actors_newest_first(&mut self) {
        self.run_actors_in(true)
    }

    fn run_actors_in(&mut self, newest_first: bool) {
        loop {
            let before = lock(&self.w).trace.len();
            let mut order = self.runnable();
            if newest_first {
                order.reverse();
            }
            for i in order {
                if i < self.actors.len() {
                    self.step_actor(i);
                }
            }
            if lock(&self.w).trace.len() == before {
                return;
            }
        }
    }

    /// Sends request `i` and lets the PSP act on everything until it is answered.
    fn complete(&mut self, i: usize) -> (u16, Value) {
        self.drive(i);
        self.answer(i)
    }

    /// Sends request `i` and lets the PSP act on everything until the request waits no more
    /// (answered, or sent back to its client to retry later).
    fn drive(&mut self, i: usize) {
        self.send(i);
        for _ in 0..100 {
            self.run_actors();
            if self.requests[i].state != ReqState::Waiting {
                break;
            }
            if !lock(&self.w).psp.pending.is_empty() {
                self.psp(Psp::Act);
            }
        }
    }

    fn answer(&self, i: usize) -> (u16, Value) {
        let (status, body) = self.requests[i].answer.clone().expect("answered");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn give_up(&mut self, i: usize) {
        self.note(format!("client: gives up on {}", self.requests[i].key));
        self.requests[i].state = ReqState::Ready;
    }

    /// The client never comes back.
    fn abandon(&mut self, i: usize) {
        self.requests[i].state = ReqState::Done;
    }

    fn advance(&mut self, ms: i64) {
        lock(&self.w).now_ms += ms;
    }

    /// Delivers every event due, in the order sent, until none is left.
    fn deliver_events(&mut self) {
        for _ in 0..200 {
            if lock(&self.w).psp.events.is_empty() {
                return;
            }
            self.deliver_event();
            self.run_actors();
            self.advance(100);
        }
    }

    fn emit(&mut self, payment: &PaymentId, event_type: &str, mut object: Value) {
        let reference = self.reference(payment);
        object["payment_intent"] = json!(reference);
        lock(&self.w).emit(event_type, &reference, object);
    }

    fn reference(&self, payment: &PaymentId) -> String {
        lock(&self.w).db.payments[payment]
            .psp_reference
            .clone()
            .expect("authorized at the PSP")
    }

    /// An authorized payment of `amount`, manual capture.
    fn authorized(&mut self, amount: i64) -> PaymentId {
        let p = self.add_payment(amount, true);
        let confirm = self.request(&p, Kind::Confirm, None);
        lock(&self.w).rng = Rng::new(1); // no decline
        assert_eq!(self.complete(confirm).0, 200);
        p
    }

    /// Request `k` starts; a second incarnation of its actor starts while the first waits for
    /// the PSP; `k`'s client gives up, and its retry takes the key over and reaches the second.
    /// Then the PSP answers both, the second incarnation's call first if `second_first`.
    fn race_with_a_second_incarnation(&mut self, k: usize, second_first: bool) {
        self.send(k);
        self.run_actors();
        self.split();
        self.give_up(k);
        self.advance(LEASE_MS + 500);
        self.send(k);
        self.run_actors();
        if second_first {
            // The second incarnation's call, and that incarnation, go first.
            self.psp_at(1, Psp::Act);
            self.run_actors_newest_first();
        }
        self.psp(Psp::Act);
    }

    /// A captured payment of `amount`.
    fn captured(&mut self, amount: i64) -> PaymentId {
        let p = self.authorized(amount);
        let capture = self.request(&p, Kind::Capture, Some(amount));
        assert_eq!(self.complete(capture).0, 200);
        self.deliver_events();
        p
    }

    fn state(&self, p: &PaymentId) -> payrail::domain::PaymentState {
        lock(&self.w).db.payments[p].state
    }

    fn attempts_of(&self, i: usize) -> usize {
        let key = &self.requests[i].key;
        lock(&self.w)
            .db
            .attempts
            .values()
            .filter(|a| a.attempt.idem_key.as_deref() == Some(key.as_str()))
            .count()
    }

    /// Settles the world and asserts every invariant.
    fn verdict(&mut self) -> Result<(), String> {
        self.drain()?;
        let bad = self.check();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

fn ensure(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// Finding 1: a slow PSP holds three refunds; refund K waits behind them, its client gives up,
/// the key's lease runs out and the retry takes the key over. Before the fix both copies of K
/// refunded. Now the first copy is fenced off at its first commit and the retry refunds once.
fn key_takeover_while_queued() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let ahead: Vec<usize> = (0..3).map(|_| s.request(&p, Kind::Refund, Some(100))).collect();
    for &i in &ahead {
        s.send(i);
    }
    let k = s.request(&p, Kind::Refund, Some(200));
    s.send(k);
    s.run_actors();
    s.give_up(k);
    s.advance(LEASE_MS + 500);
    s.send(k);
    ensure(s.requests[k].fence == 2, "the retry took the key over")?;
    s.verdict()?;
    ensure(
        s.attempts_of(k) == 1,
        format!("key K started {} attempts", s.attempts_of(k)),
    )?;
    ensure(
        s.state(&p).refunded == 500,
        format!("refunded {}", s.state(&p).refunded),
    )?;
    ensure(s.answer(k).0 == 201, "the retry is answered with K's refund")
}

/// Finding 3: a second incarnation completes refund K while the first still waits for the
/// PSP; the first then loses the write race. Before the fix it reloaded and ran the refund
/// again (a second refund). Now it resumes by key and finds K done.
fn lost_race_resumes_by_key() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let k = s.request(&p, Kind::Refund, Some(300));
    s.race_with_a_second_incarnation(k, true);
    s.verdict()?;
    ensure(
        s.attempts_of(k) == 1,
        format!("key K started {} attempts", s.attempts_of(k)),
    )?;
    ensure(
        s.state(&p).refunded == 300,
        format!("refunded {}", s.state(&p).refunded),
    )
}

/// Finding 3, capture: the loser of the race must not answer its key with a 409.
fn lost_race_capture_answers_its_success() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.authorized(1000);
    let k = s.request(&p, Kind::Capture, Some(1000));
    s.race_with_a_second_incarnation(k, false);
    s.verdict()?;
    ensure(
        s.answer(k).0 == 200,
        format!("the capture's key answered {}", s.answer(k).0),
    )
}

/// Finding 4: the commit that records a refund's attempt lands but reports failure, and the
/// client never comes back. Before the fix the actor never learnt of the attempt and the
/// sweeper's Resolve found nothing to do: stuck forever. Now the actor reloads, and the
/// sweeper's Resolve starts from the store.
fn ambiguous_commit_is_resolved_from_the_store() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let k = s.request(&p, Kind::Refund, Some(300));
    lock(&s.w).force_ambiguous = 1;
    s.send(k);
    s.run_actors();
    s.abandon(k);
    s.verdict()?;
    ensure(
        s.state(&p).refunded + s.state(&p).refund_pending <= 300,
        "at most one refund",
    )
}

/// A create with confirm whose first commit lands while its batch's COMMIT goes unanswered: the
/// ledger shard writes the commit again, and that second run finds the key the first run
/// claimed (`KeyHeld`). The request looks for its payment, finds it, and goes on at once
/// (authorized, captured, 201 on its first send). Without the look (`KeyHeld` taken as final)
/// it fell back to the ordinary claim, met its own key in flight, and its client could only
/// wait out the key's lease.
fn a_create_whose_first_commit_ran_twice_goes_on() -> Result<(), String> {
    let mut s = Sim::scripted();
    let (p, draft) = s.new_payment(1000, false);
    s.drafts.push(draft);
    let k = s.request(&p, Kind::Create(true), None);
    lock(&s.w).rng = Rng::new(1); // no decline
    lock(&s.w).force_rerun = 1;
    s.drive(k);
    ensure(
        s.requests[k].state == ReqState::Done && s.requests[k].tries == 1,
        format!(
            "the create is {:?} after {} sends, not answered on its first",
            s.requests[k].state, s.requests[k].tries
        ),
    )?;
    ensure(s.answer(k).0 == 201, format!("the create answered {}", s.answer(k).0))?;
    ensure(
        s.state(&p).status == Status::Captured,
        format!("the payment is {:?}", s.state(&p).status),
    )?;
    s.verdict()?;
    ensure(
        s.attempts_of(k) == 1,
        format!("the create's key started {} attempts", s.attempts_of(k)),
    )
}

/// A create (confirmed, captured at once) whose commit lands while reported failed, at each of
/// its commits in turn: whatever the re-run computes, the create answers what its key stored,
/// since every retry of the key replays that.
fn a_create_answers_what_its_key_replays_whichever_commit_went_unanswered() -> Result<(), String> {
    // Each of the create's commits in turn, until one past its last (the fault then never fires).
    for nth in 1.. {
        let mut s = Sim::scripted();
        let (p, draft) = s.new_payment(1000, false);
        s.drafts.push(draft);
        let k = s.request(&p, Kind::Create(true), None);
        lock(&s.w).rng = Rng::new(1); // no decline
        lock(&s.w).ambiguous_nth = nth;
        s.drive(k);
        if lock(&s.w).ambiguous_nth != 0 {
            return ensure(nth > 2, format!("the create made only {} commits", nth - 1));
        }
        s.verdict()?;
        let answered = s.requests[k].answer.clone();
        let key = s.requests[k].key.clone();
        let stored = lock(&s.w).db.idempotency.get(&key).and_then(|row| row.response.clone());
        ensure(
            answered.is_some() && answered == stored,
            format!(
                "commit {nth} unanswered: the create answered {:?}, its key replays {:?}",
                answered.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned())),
                stored.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
            ),
        )?;
    }
    unreachable!("a create makes a bounded number of commits")
}

/// Finding 5: capture 1,000, refund 400, then the PSP disputes 1,000. The dispute takes 600.
fn dispute_takes_at_most_what_is_left() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let r = s.request(&p, Kind::Refund, Some(400));
    assert_eq!(s.complete(r).0, 201);
    s.emit(
        &p,
        "charge.dispute.created",
        json!({ "id": "du_1", "amount": 1000, "currency": "eur" }),
    );
    s.deliver_events();
    s.verdict()?;
    let st = s.state(&p);
    ensure(st.disputed == 600, format!("disputed {}", st.disputed))?;
    let exceptions = lock(&s.w).db.exceptions.len();
    ensure(exceptions == 1, "the clamp is kept as an exception")
}

/// Finding 6: a refund pending at the PSP, then a lost dispute ends the payment `refunded`,
/// then the PSP says the refund succeeded. The state machine refuses it: the refund row stays
/// as it was, nothing is journaled, and the fact is an exception.
fn a_refused_outcome_has_no_side_effects() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let r = s.request(&p, Kind::Refund, Some(300));
    s.send(r);
    s.run_actors();
    s.psp_refund_pending();
    s.run_actors();
    let reference = s.reference(&p);
    s.emit(
        &p,
        "charge.dispute.created",
        json!({ "id": "du_1", "amount": 700, "currency": "eur" }),
    );
    s.deliver_events();
    s.emit(
        &p,
        "charge.dispute.closed",
        json!({ "id": "du_1", "status": "lost", "amount": 700 }),
    );
    s.deliver_events();
    ensure(
        lock(&s.w).db.payments[&p].status() == Status::Refunded,
        "the lost dispute ends it refunded",
    )?;
    {
        let mut w = lock(&s.w);
        let intent = w.psp.intents.get_mut(&reference).expect("intent");
        for r in intent.refunds.iter_mut() {
            r.3 = PspRefundStatus::Succeeded;
        }
        w.announce_refunds(&reference);
    }
    s.deliver_events();
    s.verdict()?;
    let w = lock(&s.w);
    let refund = w.db.refunds.values().next().expect("the refund");
    ensure(
        refund.status == RefundStatus::Pending,
        format!("refund row is {:?}", refund.status),
    )?;
    ensure(
        w.db.exceptions.iter().any(|(_, x)| x.contains("RefundSucceeded")),
        "the refused refund is an exception",
    )
}

/// Finding 7: a charge listing two refunds settles both, whatever order its events come in;
/// a dispute closed before it was opened waits for the opening.
fn out_of_order_events_wait_and_every_listed_refund_settles() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    // Pending at the PSP: settled below by one event that lists both.
    s.refunds_pending_at_the_psp(&p, &[100, 200]);
    let reference = s.reference(&p);
    {
        let mut w = lock(&s.w);
        for r in w.psp.intents.get_mut(&reference).expect("intent").refunds.iter_mut() {
            r.3 = PspRefundStatus::Succeeded;
        }
        w.announce_refunds(&reference);
    }
    s.emit(
        &p,
        "charge.dispute.closed",
        json!({ "id": "du_9", "status": "won", "amount": 100 }),
    );
    s.emit(
        &p,
        "charge.dispute.created",
        json!({ "id": "du_9", "amount": 100, "currency": "eur" }),
    );
    // The closing comes first: it must wait for the opening rather than vanish.
    s.deliver_event();
    s.run_actors();
    s.advance(600);
    s.deliver_events();
    s.verdict()?;
    let st = s.state(&p);
    ensure(st.refunded == 300, format!("refunded {}", st.refunded))?;
    let w = lock(&s.w);
    let d = w.db.disputes.values().next().expect("the dispute");
    ensure(d.status == DisputeStatus::Won, format!("the dispute is {:?}", d.status))
}

/// Finding 8: a request that meets someone else's open attempt resends it; the PSP refuses
/// that one. The request itself goes on and answers for itself, not with the other's 400.
fn anothers_refused_attempt_does_not_fail_this_request() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.authorized(1000);
    let k1 = s.request(&p, Kind::Capture, Some(1000));
    s.send(k1);
    s.run_actors();
    s.psp(Psp::Timeout);
    s.run_actors();
    s.abandon(k1);
    let k2 = s.request(&p, Kind::Cancel, None);
    s.send(k2);
    s.run_actors();
    s.psp(Psp::Refuse);
    s.run_actors();
    s.psp(Psp::Act);
    s.run_actors();
    s.verdict()?;
    let (status, body) = s.answer(k2);
    ensure(status == 200, format!("the cancel answered {status}: {body}"))?;
    ensure(body["status"] == "canceled", format!("{body}"))
}

/// A payment a rule held for review stays held however its news arrives: here the PSP's
/// answer to the authorization is lost, its `amount_capturable_updated` event cannot find the
/// payment yet (its reference is in the lost answer) and is redelivered, and the sweeper
/// resolves the attempt. The payment ends `in_review`, never capturable behind the merchant's
/// back, and the PSP was asked to authorize only (manual capture).
fn review_holds_through_a_lost_answer_and_redelivered_events() -> Result<(), String> {
    let mut s = Sim::scripted();
    let (p, confirm) = s.confirmed_under_review(Psp::ActThenTimeout);
    s.abandon(confirm);
    s.verdict()?;
    let st = s.state(&p);
    let psp_captured = lock(&s.w).psp.intents.values().map(|i| i.captured).sum::<i64>();
    ensure(
        (st.status, st.captured, psp_captured) == (Status::InReview, 0, 0),
        format!(
            "ended {:?}, captured {} (PSP captured {psp_captured})",
            st.status, st.captured
        ),
    )
}

/// Finding 10: an event in another currency is never applied; it is an exception.
fn an_event_in_another_currency_is_not_applied() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.authorized(1000);
    lock(&s.w).psp.events.clear();
    s.emit(
        &p,
        "payment_intent.succeeded",
        json!({ "id": s.reference(&p), "amount_received": 1000, "currency": "usd" }),
    );
    s.deliver_events();
    ensure(s.state(&p).status == Status::Authorized, "still authorized")?;
    ensure(s.state(&p).captured == 0, "nothing captured")?;
    let exceptions = lock(&s.w).db.exceptions.len();
    ensure(exceptions == 1, "kept as an exception")
}

/// A refund the PSP refuses, whose closing commit lands while its COMMIT goes unanswered: the
/// request runs again from the store and must find its refused attempt by its key (400, nothing
/// refunded). Before the fix the close had taken the key off the request and the failed commit
/// never put it back, so the re-run started a second refund with an attempt under no key: its
/// outcome was not the key's answer, and a retry of the key answered the first one's refusal.
fn a_refused_refund_whose_close_is_ambiguous_answers_its_refusal() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    let k = s.request(&p, Kind::Refund, Some(300));
    s.send(k);
    s.run_actors();
    lock(&s.w).force_ambiguous = 1;
    s.psp(Psp::Refuse);
    s.run_actors();
    s.verdict()?;
    let (status, body) = s.answer(k);
    ensure(status == 400, format!("the refund answered {status}: {body}"))?;
    let refunded = s.state(&p).refunded;
    ensure(refunded == 0, format!("refunded {refunded}"))?;
    let w = lock(&s.w);
    ensure(
        w.db.refunds.len() == 1,
        format!("{} refunds for one key", w.db.refunds.len()),
    )?;
    let unkeyed = w.db.attempts.values().filter(|a| a.attempt.idem_key.is_none()).count();
    ensure(unkeyed == 0, format!("{unkeyed} attempts under no key"))
}

/// A refund event that lists one refund twice, once succeeded and once failed (a PSP
/// contradicting itself): neither is applied, so the other pending refund keeps its reservation.
/// Before the fix each listing settled the same pending refund again: its journal posted, then
/// a failure released 100 more of the reservation, which the other refund still held.
fn a_refund_listed_twice_settles_at_most_once() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.captured(1000);
    s.refunds_pending_at_the_psp(&p, &[100, 100]);
    let reference = s.reference(&p);
    let first = lock(&s.w).psp.intents[&reference].refunds[0].0.clone();
    s.emit(
        &p,
        "charge.refunded",
        json!({ "object": "charge", "currency": "eur", "refunds": { "data": [
            { "id": first, "status": "succeeded" }, { "id": first, "status": "failed" } ] } }),
    );
    s.deliver_events();
    let st = s.state(&p);
    ensure(
        (st.refunded, st.refund_pending) == (0, 200),
        format!("refunded {}, pending {}", st.refunded, st.refund_pending),
    )?;
    let exceptions = lock(&s.w).db.exceptions.len();
    ensure(exceptions == 1, format!("{exceptions} exceptions"))
}

/// A dispute for a payment with nothing captured opens nothing, and says so.
fn a_dispute_of_a_payment_with_nothing_to_dispute_is_an_exception() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.authorized(1000);
    s.emit(&p, "charge.dispute.created", json!({ "id": "du_1", "currency": "eur" }));
    s.deliver_events();
    s.verdict()?;
    ensure(s.state(&p).disputed == 0, "nothing disputed")?;
    let exceptions = lock(&s.w).db.exceptions.len();
    ensure(exceptions == 1, format!("{exceptions} exceptions"))
}

/// The merchant approves a payment held for review, with automatic capture. The approval lands;
/// the capture's first commit does not (a partition handed over, a conflict) and the payment is
/// reloaded. The re-run must go on with the capture this request's approval promised. Before the
/// fix it ran the approval again, which a payment already authorized refuses: a 409 stored as
/// the key's answer, and the payment never captured.
fn an_approval_whose_capture_did_not_commit_captures_after_the_reload() -> Result<(), String> {
    let mut s = Sim::scripted();
    let (p, _) = s.confirmed_under_review(Psp::Act);
    ensure(
        s.state(&p).status == Status::InReview,
        format!("held: {:?}", s.state(&p).status),
    )?;
    let k = s.request(&p, Kind::Approve, None);
    lock(&s.w).refuse_nth = 2;
    s.send(k);
    s.run_actors();
    s.psp(Psp::Act);
    s.run_actors();
    s.verdict()?;
    let (status, body) = s.answer(k);
    ensure(status == 200, format!("the approval answered {status}: {body}"))?;
    ensure(
        s.state(&p).status == Status::Captured,
        format!("the payment is {:?}", s.state(&p).status),
    )
}

/// The approval of a payment held for review, with automatic capture, whose commits each in turn
/// land while reported failed (the approval's own commit is the one `approval_unanswered`
/// resumes from): the payment is captured once, and the approval answers 200, what its key
/// replays.
fn an_approval_whose_commit_went_unanswered_captures_once() -> Result<(), String> {
    for nth in 1.. {
        let mut s = Sim::scripted();
        let (p, _) = s.confirmed_under_review(Psp::Act);
        let k = s.request(&p, Kind::Approve, None);
        lock(&s.w).ambiguous_nth = nth;
        s.send(k);
        for _ in 0..10 {
            s.run_actors();
            if lock(&s.w).psp.pending.is_empty() {
                break;
            }
            s.psp(Psp::Act);
        }
        if lock(&s.w).ambiguous_nth != 0 {
            // One past the approval's last commit: the approval's own and its capture's were
            // each tried.
            return ensure(nth > 2, format!("the approval made only {} commits", nth - 1));
        }
        s.verdict()?;
        let (status, body) = s.answer(k);
        ensure(
            status == 200,
            format!("commit {nth} unanswered: the approval answered {status}: {body}"),
        )?;
        let key = s.requests[k].key.clone();
        let stored = lock(&s.w).db.idempotency.get(&key).and_then(|row| row.response.clone());
        ensure(
            stored == s.requests[k].answer,
            format!("commit {nth} unanswered: the key replays {stored:?}"),
        )?;
        let st = s.state(&p);
        ensure(
            st.status == Status::Captured && st.captured == 1000,
            format!(
                "commit {nth} unanswered: the payment is {:?}, {} captured",
                st.status, st.captured
            ),
        )?;
    }
    unreachable!("an approval makes a bounded number of commits")
}

/// A cancel whose commit (which stores its 200 as the key's answer) lands while reported failed:
/// the reload finds the payment canceled, and the re-run's refusal (409) must not be the answer,
/// since every retry of the key replays the stored 200.
fn a_cancel_whose_commit_landed_unanswered_answers_what_its_key_replays() -> Result<(), String> {
    let mut s = Sim::scripted();
    let p = s.add_payment(1000, true);
    let k = s.request(&p, Kind::Cancel, None);
    lock(&s.w).force_ambiguous = 1;
    s.send(k);
    s.run_actors();
    s.verdict()?;
    let (status, body) = s.answer(k);
    ensure(status == 200, format!("the cancel answered {status}: {body}"))?;
    ensure(
        s.state(&p).status == Status::Canceled,
        format!("the payment is {:?}", s.state(&p).status),
    )
}

/// A scripted scenario: `Err` says which invariant broke.
pub type Scenario = fn() -> Result<(), String>;

pub const ALL: &[(&str, Scenario)] = &[
    ("finding 1: key takeover while queued", key_takeover_while_queued),
    ("finding 3: lost race resumes by key (refund)", lost_race_resumes_by_key),
    (
        "finding 3: lost race resumes by key (capture)",
        lost_race_capture_answers_its_success,
    ),
    (
        "finding 4: ambiguous commit resolved from the store",
        ambiguous_commit_is_resolved_from_the_store,
    ),
    (
        "a create whose first commit ran twice goes on at once",
        a_create_whose_first_commit_ran_twice_goes_on,
    ),
    (
        "an approval whose commit went unanswered captures once",
        an_approval_whose_commit_went_unanswered_captures_once,
    ),
    (
        "a create answers what its key replays, whichever commit went unanswered",
        a_create_answers_what_its_key_replays_whichever_commit_went_unanswered,
    ),
    (
        "finding 5: dispute takes at most what is left",
        dispute_takes_at_most_what_is_left,
    ),
    (
        "finding 6: a refused outcome has no side effects",
        a_refused_outcome_has_no_side_effects,
    ),
    (
        "finding 7: out-of-order events wait; every listed refund settles",
        out_of_order_events_wait_and_every_listed_refund_settles,
    ),
    (
        "finding 8: another's refused attempt does not fail this request",
        anothers_refused_attempt_does_not_fail_this_request,
    ),
    (
        "finding 10: an event in another currency is not applied",
        an_event_in_another_currency_is_not_applied,
    ),
    (
        "a refused refund whose close is ambiguous answers its refusal",
        a_refused_refund_whose_close_is_ambiguous_answers_its_refusal,
    ),
    (
        "a refund listed twice settles at most once",
        a_refund_listed_twice_settles_at_most_once,
    ),
    (
        "a dispute of a payment with nothing to dispute is an exception",
        a_dispute_of_a_payment_with_nothing_to_dispute_is_an_exception,
    ),
    (
        "an approval whose capture did not commit captures after the reload",
        an_approval_whose_capture_did_not_commit_captures_after_the_reload,
    ),
    (
        "a cancel whose commit landed unanswered answers what its key replays",
        a_cancel_whose_commit_landed_unanswered_answers_what_its_key_replays,
    ),
    (
        "risk: review holds through a lost answer and redelivered events",
        review_holds_through_a_lost_answer_and_redelivered_events,
    ),
];
