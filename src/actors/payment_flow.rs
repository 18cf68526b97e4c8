//! What a payment actor does with one message, as plain async code over owned state. The
//! actor runs it atomically (no other message starts until it ends), so nothing here needs a
//! lock. It follows DESIGN.md, "Calling the PSP safely": decide (pure), record the attempt,
//! call the PSP with a timeout, commit the outcome with its journal, outbox row and
//! idempotency record in one transaction, reply.

use std::time::Duration;

use serde_json::Value;

use super::payment::{IdemKey, Op, Reply};
use super::store::{Clock, PaymentStore};
use crate::adapters::nats::PspEvent;
use crate::adapters::postgres::commit::{
    AttemptOutcome, Commit, CommitError, IdempotencyWrite, OutboxEvent, ProcessedEvent, Transition,
};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::psp::{AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspRefund, PspRefundStatus};
use crate::domain::ledger::{postings, Journal};
use crate::domain::{
    decide, AttemptId, Dispute, DisputeId, DisputeStatus, Effect, Input, Money, NextAction, Payment, PspOp, Refund,
    RefundId, RefundStatus, Status,
};
use crate::error::ApiError;

/// The status of the answer to a PSP event that was already applied (HTTP's "Already
/// Reported"): the consumer acknowledges it as a duplicate. Events never reach an HTTP client.
pub const DUPLICATE_EVENT: u16 = 208;

/// The most refunds one `charge.refunded` event settles: a charge lists at most this many
/// (Stripe pages a charge's refunds by 100); the rest come in their own events.
const MAX_LISTED_REFUNDS: usize = 100;

/// What a payment actor needs from the world.
pub struct PaymentDeps {
    /// Reads, and every commit (in production: the ledger shards' group commit).
    pub store: std::sync::Arc<dyn PaymentStore>,
    pub psp: std::sync::Arc<dyn Psp>,
    /// How long a PSP call may take before its outcome counts as unknown; `None` leaves it to
    /// the PSP (the simulation's PSP decides itself when, and whether, it answers).
    pub psp_timeout: Option<Duration>,
    pub clock: std::sync::Arc<dyn Clock>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
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
    error: ApiError,
    stale: bool,
}

impl From<ApiError> for Halt {
    fn from(error: ApiError) -> Halt {
        Halt { error, stale: false }
    }
}

impl From<CommitError> for Halt {
    fn from(e: CommitError) -> Halt {
        match e {
            CommitError::Stale => Halt {
                error: ApiError::Unavailable("payment state"),
                stale: true,
            },
            CommitError::Fenced => Halt {
                error: ApiError::IdempotencyKeyInUse,
                stale: false,
            },
            // Ambiguous: the transaction may have committed. Memory is no longer the truth.
            CommitError::Api(error) => Halt { error, stale: true },
        }
    }
}

/// Processes one call; returns the answer, the state as committed, and whether the state is stale.
pub async fn process(
    deps: &PaymentDeps,
    live: Live,
    op: Op,
    idem: Option<IdemKey>,
) -> (Result<Reply, ApiError>, Live, bool) {
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
    };
    let mut result = if matches!(op, Op::Resolve) {
        // The sweeper found an attempt open in the store: memory may not know it (an ambiguous
        // commit), so start from the store.
        Err(Halt {
            error: ApiError::Unavailable("payment state"),
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
                flow.live = live;
                flow.by_key = true;
                result = flow.execute(op).await;
            }
            Ok(None) => result = Err(ApiError::NotFound("payment").into()),
            Err(e) => result = Err(Halt { error: e, stale: true }),
        }
    }
    if flow.fenced && result.is_ok() {
        // A newer request with the same key took it over while this one ran: what this one did
        // is committed, and the newer request answers for the key.
        result = Err(ApiError::IdempotencyKeyInUse.into());
    }
    let status = flow.live.payment.status().as_str();
    match &result {
        Ok(reply) => tracing::debug!(reply = reply.status, status, "payment message handled"),
        Err(h) => tracing::debug!(error = h.error.code(), status, "payment message refused"),
    }
    match result {
        Ok(reply) => (Ok(reply), flow.live, false),
        Err(h) => (Err(h.error), flow.live, h.stale),
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
}

/// What the PSP's answer means for the state machine, and what it changes besides.
struct Outcome {
    input: Option<Input>,
    attempt: AttemptOutcome,
    reference: Option<String>,
    client_secret: Option<String>,
    next_action: Option<NextAction>,
    failure: Option<crate::domain::Failure>,
    refund_status: Option<RefundStatus>,
    /// A PSP fact to keep for an operator.
    exception: Option<String>,
}

impl Outcome {
    fn of_intent(intent: Intent, op: PspOp) -> Outcome {
        let mut o = Outcome {
            input: None,
            attempt: AttemptOutcome::Succeeded,
            reference: Some(intent.reference),
            client_secret: Some(intent.client_secret),
            next_action: None,
            failure: None,
            refund_status: None,
            exception: None,
        };
        match (intent.status, op) {
            (IntentStatus::Authorized { .. }, _) => o.input = Some(Input::Authorized),
            (IntentStatus::Succeeded { amount_captured }, PspOp::Capture { .. } | PspOp::Authorize) => {
                o.input = Some(match op {
                    PspOp::Capture { .. } => Input::Captured {
                        amount: amount_captured,
                    },
                    _ => Input::Charged {
                        amount: amount_captured,
                    },
                })
            }
            (IntentStatus::Succeeded { .. }, _) => {}
            (IntentStatus::RequiresAction { redirect_url }, _) => {
                o.attempt = AttemptOutcome::RequiresAction;
                o.next_action = Some(NextAction {
                    kind: "three_d_secure".into(),
                    redirect_url,
                });
                o.input = Some(Input::ActionRequired);
            }
            (IntentStatus::Failed(f), _) => {
                o.attempt = AttemptOutcome::Failed;
                o.failure = Some(f);
                o.input = Some(Input::AuthorizationFailed);
            }
            (IntentStatus::Canceled, _) => o.input = Some(Input::Canceled),
        }
        o
    }

    /// An event that changes nothing but is recorded.
    fn recorded() -> Outcome {
        Outcome {
            input: None,
            attempt: AttemptOutcome::Succeeded,
            reference: None,
            client_secret: None,
            next_action: None,
            failure: None,
            refund_status: None,
            exception: None,
        }
    }

    fn of_refund(refund: PspRefund, amount: i64) -> Outcome {
        let (input, attempt, status) = match refund.status {
            PspRefundStatus::Succeeded => (
                Some(Input::RefundSucceeded { amount }),
                AttemptOutcome::Succeeded,
                RefundStatus::Succeeded,
            ),
            PspRefundStatus::Failed => (
                Some(Input::RefundFailed { amount }),
                AttemptOutcome::Failed,
                RefundStatus::Failed,
            ),
            PspRefundStatus::Pending => (None, AttemptOutcome::Pending, RefundStatus::Pending),
        };
        Outcome {
            input,
            attempt,
            reference: Some(refund.reference),
            client_secret: None,
            next_action: None,
            failure: None,
            refund_status: Some(status),
            exception: None,
        }
    }
}

impl<'a> Flow<'a> {
    fn payment(&self) -> &Payment {
        &self.live.payment
    }

    async fn execute(&mut self, op: Op) -> Result<Reply, Halt> {
        if let (true, Some(key)) = (self.by_key, self.idem_key()) {
            // The key's earlier request may have started an attempt that memory does not hold.
            if let Some((attempt, None)) = self.deps.store.attempt_by_key(&self.payment().id, &key).await? {
                if !self.live.open.iter().any(|a| a.id == attempt.id) {
                    self.live.open.push(attempt);
                }
            }
        }
        // A retry of a request whose PSP call was left open is answered by that call's outcome.
        if let Some(reply) = self.resolve_open_attempts(op.reply_status()).await? {
            return Ok(reply);
        }
        if let (true, Some(key)) = (self.by_key, self.idem_key()) {
            if let Some((attempt, Some(outcome))) = self.deps.store.attempt_by_key(&self.payment().id, &key).await? {
                // The key's work is done: answer with what it did, never do it again.
                return self.answer_finished(&attempt, outcome, op.reply_status()).await;
            }
        }
        self.run(op).await
    }

    /// The answer for a key whose PSP attempt already ended: the resource as it stands.
    async fn answer_finished(
        &mut self,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        status: u16,
    ) -> Result<Reply, Halt> {
        if outcome == AttemptOutcome::Rejected {
            return Err(ApiError::invalid(
                "psp_request_invalid",
                "the PSP refused this request; nothing was charged or refunded",
                None,
            )
            .into());
        }
        match &attempt.refund_id {
            Some(id) => {
                let refund = self.deps.store.refund(&self.payment().id, id).await?;
                let refund = refund.ok_or(ApiError::NotFound("refund"))?;
                Ok(Reply {
                    status,
                    body: reply_body(&refund.to_object()),
                    stored: false,
                })
            }
            None => Ok(self.payment_reply(status)),
        }
    }

    async fn run(&mut self, op: Op) -> Result<Reply, Halt> {
        match op {
            Op::Confirm {
                payment_method,
                created,
            } => self.confirm(payment_method, created).await,
            Op::Capture { amount } => self.capture(amount).await,
            Op::Cancel => self.cancel().await,
            Op::Refund { amount, reason, resume } => self.refund(amount, reason, resume).await,
            Op::Sync => self.sync().await,
            Op::Resolve => Ok(self.payment_reply(200)),
            Op::PspEvent(e) => self.psp_event(&e).await,
        }
    }

    async fn confirm(&mut self, payment_method: Option<String>, created: bool) -> Result<Reply, Halt> {
        let status = if created { 201 } else { 200 };
        // A create retried after a crash finds its confirm already done: report where it stands.
        if created && self.payment().status() != Status::Pending {
            return Ok(self.payment_reply(status));
        }
        let (_, effects) =
            decide(&self.payment().state, Input::Confirm).map_err(|r| ApiError::from_rejection(r, "amount"))?;
        debug_assert_eq!(effects, vec![Effect::Psp(PspOp::Authorize)]);
        let mut next = self.next_version();
        if let Some(pm) = payment_method {
            next.payment_method = pm;
        }
        let attempt = Attempt {
            id: self.new_attempt_id(),
            op: PspOp::Authorize,
            refund_id: None,
            idem_key: self.idem_key(),
        };
        self.commit(
            next,
            Commit {
                attempt_started: Some(attempt.clone()),
                ..Commit::default()
            },
        )
        .await?;
        self.live.open.push(attempt.clone());
        self.perform(attempt, "api.confirm", status, None).await
    }

    async fn capture(&mut self, amount: Option<Money>) -> Result<Reply, Halt> {
        let amount = self.amount_in_currency(amount, self.payment().state.capturable)?;
        let (_, effects) = decide(&self.payment().state, Input::Capture { amount })
            .map_err(|r| ApiError::from_rejection(r, "amount.value"))?;
        debug_assert_eq!(effects, vec![Effect::Psp(PspOp::Capture { amount })]);
        let attempt = Attempt {
            id: self.new_attempt_id(),
            op: PspOp::Capture { amount },
            refund_id: None,
            idem_key: self.idem_key(),
        };
        let next = self.next_version();
        self.commit(
            next,
            Commit {
                attempt_started: Some(attempt.clone()),
                ..Commit::default()
            },
        )
        .await?;
        self.live.open.push(attempt.clone());
        self.perform(attempt, "api.capture", 200, None).await
    }

    async fn cancel(&mut self) -> Result<Reply, Halt> {
        let (state, effects) =
            decide(&self.payment().state, Input::Cancel).map_err(|r| ApiError::from_rejection(r, "amount"))?;
        if effects.is_empty() {
            // Nothing reached the PSP yet: the cancel is ours alone.
            let mut next = self.next_version();
            next.state = state;
            let body = reply_body(&next.to_object());
            let commit = self.transition_commit(
                &self.live.payment.clone(),
                &next,
                "api.cancel",
                Some((200, body.clone())),
            );
            self.commit(next, commit).await?;
            return Ok(Reply {
                status: 200,
                body,
                stored: self.idem.is_some(),
            });
        }
        let attempt = Attempt {
            id: self.new_attempt_id(),
            op: PspOp::Cancel,
            refund_id: None,
            idem_key: self.idem_key(),
        };
        let next = self.next_version();
        self.commit(
            next,
            Commit {
                attempt_started: Some(attempt.clone()),
                ..Commit::default()
            },
        )
        .await?;
        self.live.open.push(attempt.clone());
        self.perform(attempt, "api.cancel", 200, None).await
    }

    async fn refund(
        &mut self,
        amount: Option<Money>,
        reason: Option<String>,
        resume: Option<RefundId>,
    ) -> Result<Reply, Halt> {
        if let Some(id) = resume {
            // The first request with this key created the refund and then died; the open
            // attempts are resolved by now, so report the refund as it stands.
            let refund = self.deps.store.refund(&self.payment().id, &id).await?;
            let refund = refund.ok_or(ApiError::NotFound("refund"))?;
            return Ok(Reply {
                status: 201,
                body: reply_body(&refund.to_object()),
                stored: false,
            });
        }
        let left = self.payment().state.refundable();
        let amount = self.amount_in_currency(amount, left.max(1))?;
        let (state, _) = decide(&self.payment().state, Input::Refund { amount })
            .map_err(|r| ApiError::from_rejection(r, "amount.value"))?;
        let at = self.deps.clock.now();
        let refund = Refund {
            id: self.new_refund_id(),
            payment_id: self.payment().id.clone(),
            merchant_id: self.payment().merchant_id.clone(),
            amount: Money::new(amount, self.payment().currency),
            status: RefundStatus::Pending,
            reason,
            psp_reference: None,
            created_at: at,
            updated_at: at,
        };
        let attempt = Attempt {
            id: self.new_attempt_id(),
            op: PspOp::Refund { amount },
            refund_id: Some(refund.id.clone()),
            idem_key: self.idem_key(),
        };
        let mut next = self.next_version();
        next.state = state;
        let mut commit = self.transition_commit(&self.live.payment.clone(), &next, "api.refund", None);
        commit.attempt_started = Some(attempt.clone());
        commit.refunds.push(refund.clone());
        if let Some(i) = &mut commit.idempotency {
            i.resource_id = Some(refund.id.to_string());
        }
        self.commit(next, commit).await?;
        self.live.open.push(attempt.clone());
        self.perform(attempt, "api.refund", 201, Some(refund)).await
    }

    /// Brings the payment up to what the PSP says now (after the customer finished 3-D Secure).
    async fn sync(&mut self) -> Result<Reply, Halt> {
        if self.payment().status() != Status::RequiresAction {
            return Err(ApiError::InvalidState(self.payment().status()).into());
        }
        let reference = self
            .payment()
            .psp_reference
            .clone()
            .ok_or(ApiError::InvalidState(Status::RequiresAction))?;
        let intent = self.call_psp("retrieve", self.deps.psp.retrieve(reference)).await?;
        let outcome = Outcome::of_intent(intent, PspOp::Authorize);
        self.apply(outcome, None, "psp.three_d_secure_completed", 200, None)
            .await
    }

    /// Applies a PSP event at most once (docs/API.md, "PSP events"). An event that no longer
    /// moves the payment (it is already past it) is recorded and changes nothing: never
    /// backwards. An event that comes before what it refers to (a dispute closed before it was
    /// opened, a refund settled before payrail knows its reference) is not recorded: it fails,
    /// and the consumer delivers it again later, or parks it as a dead letter.
    async fn psp_event(&mut self, e: &PspEvent) -> Result<Reply, Halt> {
        if self.deps.store.event_processed(&e.provider, &e.event_id).await? {
            return Ok(Reply {
                status: DUPLICATE_EVENT,
                body: Vec::new(),
                stored: false,
            });
        }
        let event = ProcessedEvent {
            provider: e.provider.clone(),
            event_id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            raw: e.raw.clone(),
        };
        let object: Value = serde_json::from_slice(&e.object).unwrap_or(Value::Null);
        let status = self.payment().status();
        let cause = format!("psp.{}", e.event_type);
        let currency = self.payment().currency;
        if let Some(c) = object["currency"].as_str() {
            if !c.eq_ignore_ascii_case(currency.code()) {
                // Never apply an amount in another currency: record it for an operator.
                self.event = Some(event);
                let mut o = Outcome::recorded();
                o.exception = Some(format!(
                    "{cause} {}: amount in {c}, the payment is in {}",
                    e.event_id,
                    currency.code()
                ));
                return self.settle_event(o, &cause, None).await;
            }
        }
        let mut outcome = Outcome::recorded();
        match e.event_type.as_str() {
            "payment_intent.succeeded" => {
                let amount = object["amount_received"]
                    .as_i64()
                    .or(object["amount"].as_i64())
                    .unwrap_or(self.payment().state.amount);
                outcome.input = match status {
                    Status::Pending | Status::RequiresAction => Some(Input::Charged { amount }),
                    Status::Authorized => Some(Input::Captured { amount }),
                    _ => None,
                };
            }
            "payment_intent.amount_capturable_updated" => {
                if matches!(status, Status::Pending | Status::RequiresAction) {
                    outcome.input = Some(Input::Authorized);
                }
            }
            "payment_intent.payment_failed" => {
                let err = &object["last_payment_error"];
                if matches!(status, Status::Pending | Status::RequiresAction) {
                    outcome.input = Some(Input::AuthorizationFailed);
                    outcome.failure = Some(crate::domain::Failure {
                        code: err["code"].as_str().unwrap_or("card_declined").to_owned(),
                        decline_code: err["decline_code"].as_str().map(str::to_owned),
                        message: err["message"].as_str().unwrap_or("The payment failed.").to_owned(),
                    });
                }
            }
            "payment_intent.canceled" => {
                if matches!(status, Status::Pending | Status::RequiresAction | Status::Authorized) {
                    outcome.input = Some(Input::Canceled);
                }
            }
            "charge.refunded" | "charge.refund.updated" => {
                self.event = Some(event);
                return self.settle_refunds(&object, &cause).await;
            }
            "charge.dispute.created" => {
                let reference = object["id"].as_str().unwrap_or(&e.event_id).to_owned();
                let payment_id = self.payment().id.clone();
                if self.deps.store.dispute(&payment_id, &reference).await?.is_some() {
                    // Opened already (under another event id): nothing more.
                } else {
                    let s = self.payment().state;
                    let asked = object["amount"].as_i64().unwrap_or(s.captured);
                    // docs/API.md, "Disputes": a dispute takes at most what is left of the
                    // capture once refunds (pending or succeeded) are set aside.
                    let left = s.disputable();
                    let amount = asked.min(left);
                    if amount < asked {
                        outcome.exception = Some(format!(
                            "{cause} {reference}: the PSP disputes {asked}, but only {left} is left after refunds; opened for {}",
                            amount.max(0)
                        ));
                    }
                    if amount > 0 {
                        let at = self.deps.clock.now();
                        self.dispute = Some(Dispute {
                            id: DisputeId::from_trusted(format!("{}{}", DisputeId::PREFIX, self.deps.clock.unique())),
                            payment_id,
                            merchant_id: self.payment().merchant_id.clone(),
                            psp_reference: reference,
                            amount: Money::new(amount, currency),
                            status: DisputeStatus::NeedsResponse,
                            reason: object["reason"].as_str().map(str::to_owned),
                            created_at: at,
                            updated_at: at,
                        });
                        outcome.input = Some(Input::DisputeOpened { amount });
                    }
                }
            }
            "charge.dispute.closed" => {
                let reference = object["id"].as_str().unwrap_or_default();
                let payment_id = self.payment().id.clone();
                let Some(mut d) = self.deps.store.dispute(&payment_id, reference).await? else {
                    // Its `charge.dispute.created` has not come yet: hold this one until it has.
                    return Err(ApiError::Unavailable("the dispute this event closes (not opened yet)").into());
                };
                let won = object["status"] == "won";
                if matches!(d.status, DisputeStatus::NeedsResponse | DisputeStatus::UnderReview) {
                    d.status = if won { DisputeStatus::Won } else { DisputeStatus::Lost };
                    d.updated_at = self.deps.clock.now();
                    outcome.input = Some(if won { Input::DisputeWon } else { Input::DisputeLost });
                    self.dispute = Some(d);
                }
            }
            _ => {}
        }
        self.event = Some(event);
        self.settle_event(outcome, &cause, None).await
    }

    /// Commits what an event changes, with its dedupe row.
    async fn settle_event(&mut self, outcome: Outcome, cause: &str, refund: Option<Refund>) -> Result<Reply, Halt> {
        let reply = self.apply(outcome, None, cause, 200, refund).await?;
        Ok(Reply { stored: false, ..reply })
    }

    /// A refund object, or a charge listing all its refunds: every listed refund that is
    /// pending here and final at the PSP settles, each in its own commit; the event's dedupe
    /// row rides on the last. A refund payrail does not know yet (its reference is not stored:
    /// the API's own commit is in flight) holds the event back; one payrail never made is an
    /// exception.
    async fn settle_refunds(&mut self, object: &Value, cause: &str) -> Result<Reply, Halt> {
        let listed = if object["object"] == "refund" {
            vec![object.clone()]
        } else {
            object["refunds"]["data"].as_array().cloned().unwrap_or_default()
        };
        let bound = listed.len().min(MAX_LISTED_REFUNDS);
        let listed = &listed[..bound];
        let references: Vec<String> = listed
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect();
        let known = self
            .deps
            .store
            .refunds_by_reference(&self.payment().id, &references)
            .await?;
        let mut settle = Vec::new();
        let mut unknown = Vec::new();
        for l in listed {
            let reference = l["id"].as_str().unwrap_or_default();
            let status = match l["status"].as_str() {
                Some("succeeded") => PspRefundStatus::Succeeded,
                Some("failed" | "canceled") => PspRefundStatus::Failed,
                _ => continue,
            };
            match known.iter().find(|r| r.psp_reference.as_deref() == Some(reference)) {
                Some(r) if r.status == RefundStatus::Pending => settle.push((r.clone(), status)),
                Some(_) => {}
                None => unknown.push(reference.to_owned()),
            }
        }
        if !unknown.is_empty() {
            let waiting = self.live.open.iter().any(|a| matches!(a.op, PspOp::Refund { .. }));
            if waiting {
                return Err(ApiError::Unavailable("the refund this event settles (not recorded yet)").into());
            }
        }
        let mut last = Outcome::recorded();
        if !unknown.is_empty() {
            last.exception = Some(format!("{cause}: refunds payrail did not make: {}", unknown.join(", ")));
        }
        let event = self.event.take();
        for (r, status) in settle {
            let reference = r.psp_reference.clone().unwrap_or_default();
            let o = Outcome::of_refund(PspRefund { reference, status }, r.amount.minor);
            self.apply(o, None, cause, 200, Some(r)).await?;
        }
        self.event = event;
        self.settle_event(last, cause, None).await
    }

    /// Completes what an earlier message or incarnation started: an attempt recorded but
    /// without an outcome is sent again with the same idempotency key, and its answer applied.
    /// The answer to the attempt the current request's own key started is returned, rendered
    /// with `status`, and completes that key's record.
    async fn resolve_open_attempts(&mut self, status: u16) -> Result<Option<Reply>, Halt> {
        let mut own = None;
        while let Some(attempt) = self.live.open.first().cloned() {
            tracing::info!(payment_id = %self.payment().id, attempt = %attempt.id, "completing an open PSP attempt");
            let refund = match &attempt.refund_id {
                Some(id) => self.deps.store.refund(&self.payment().id, id).await?,
                None => None,
            };
            let mine = attempt.idem_key.is_some() && attempt.idem_key == self.idem_key();
            if mine {
                // The request that started it is here: the audit trail names its API call.
                let cause = match attempt.op {
                    PspOp::Authorize => "api.confirm",
                    PspOp::Capture { .. } => "api.capture",
                    PspOp::Cancel => "api.cancel",
                    PspOp::Refund { .. } => "api.refund",
                };
                own = Some(self.perform(attempt, cause, status, refund).await?);
            } else {
                // Someone else's attempt: its answer is not this request's answer. A PSP refusal
                // closed it (nothing happened there); only an outage stops this request too.
                let saved = self.idem.take();
                let id = attempt.id.clone();
                let r = self.perform(attempt, "recovery", status, refund).await;
                self.idem = saved;
                let still_open = self.live.open.iter().any(|a| a.id == id);
                match r {
                    Ok(_) => {}
                    Err(h) if h.stale || still_open || h.error.status().as_u16() >= 500 => return Err(h),
                    Err(h) => {
                        tracing::info!(payment_id = %self.payment().id, error = h.error.code(), "an earlier request's attempt ended refused")
                    }
                }
            }
        }
        Ok(own)
    }

    fn idem_key(&self) -> Option<String> {
        self.idem.as_ref().map(|i| i.key.clone())
    }

    /// Calls the PSP for `attempt` and commits what it answers.
    async fn perform(
        &mut self,
        attempt: Attempt,
        cause: &str,
        status: u16,
        refund: Option<Refund>,
    ) -> Result<Reply, Halt> {
        let p = self.payment().clone();
        let psp = &self.deps.psp;
        let reference = || p.psp_reference.clone().unwrap_or_default();
        let answer = match attempt.op {
            PspOp::Authorize => {
                let req = AuthorizeRequest {
                    key: attempt.id.clone(),
                    payment_id: p.id.clone(),
                    merchant_id: p.merchant_id.clone(),
                    amount: p.amount(),
                    payment_method: p.payment_method.clone(),
                    capture: p.capture_strategy,
                };
                self.call_psp("authorize", psp.authorize(req))
                    .await
                    .map(|i| Outcome::of_intent(i, attempt.op))
            }
            PspOp::Capture { amount } => self
                .call_psp(
                    "capture",
                    psp.capture(attempt.id.clone(), reference(), Money::new(amount, p.currency)),
                )
                .await
                .map(|i| Outcome::of_intent(i, attempt.op)),
            PspOp::Cancel => self
                .call_psp("cancel", psp.cancel(attempt.id.clone(), reference()))
                .await
                .map(|i| Outcome::of_intent(i, attempt.op)),
            PspOp::Refund { amount } => self
                .call_psp(
                    "refund",
                    psp.refund(attempt.id.clone(), reference(), Money::new(amount, p.currency)),
                )
                .await
                .map(|r| Outcome::of_refund(r, amount)),
        };
        let outcome = match answer {
            Ok(o) => o,
            Err(Halt {
                error: ApiError::InvalidRequest { code, message, param },
                ..
            }) => {
                // The PSP refused the request: nothing happened there. Close the attempt; a
                // refund it carried gives its amount back.
                let input = match attempt.op {
                    PspOp::Refund { amount } => Some(Input::RefundFailed { amount }),
                    _ => None,
                };
                let o = Outcome {
                    input,
                    attempt: AttemptOutcome::Rejected,
                    reference: None,
                    client_secret: None,
                    next_action: None,
                    failure: None,
                    refund_status: refund.as_ref().map(|_| RefundStatus::Failed),
                    exception: None,
                };
                let saved = self.idem.take();
                self.apply(o, Some(&attempt), cause, status, refund).await?;
                self.idem = saved;
                return Err(ApiError::InvalidRequest { code, message, param }.into());
            }
            Err(h) => return Err(h),
        };
        self.apply(outcome, Some(&attempt), cause, status, refund).await
    }

    async fn call_psp<T>(
        &self,
        operation: &'static str,
        call: crate::adapters::psp::PspFuture<'_, T>,
    ) -> Result<T, Halt> {
        let started = std::time::Instant::now();
        let answer = match self.deps.psp_timeout {
            Some(limit) => tokio::time::timeout(limit, call).await,
            None => Ok(call.await),
        };
        let psp = self.deps.psp.name();
        self.deps.metrics.psp_call(psp, operation, started.elapsed());
        match &answer {
            Ok(Ok(_)) => {}
            Ok(Err(PspError::Invalid { .. })) => self.deps.metrics.psp_error(psp, "invalid_request"),
            Ok(Err(PspError::Unavailable(_))) => self.deps.metrics.psp_error(psp, "unavailable"),
            Err(_) => self.deps.metrics.psp_error(psp, "timeout"),
        }
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(PspError::Invalid { code, message, param })) => {
                let code: &'static str = match code.as_str() {
                    "resource_missing" => "resource_missing",
                    "amount_too_large" => "amount_too_large",
                    _ => "psp_request_invalid",
                };
                Err(ApiError::InvalidRequest { code, message, param }.into())
            }
            Ok(Err(PspError::Unavailable(e))) => {
                tracing::warn!(payment_id = %self.payment().id, error = %e, "PSP unavailable");
                Err(ApiError::Unavailable("psp").into())
            }
            Err(_) => {
                tracing::warn!(payment_id = %self.payment().id, "PSP call timed out");
                Err(ApiError::Unavailable("psp").into())
            }
        }
    }

    /// Applies a PSP outcome: the state machine decides, and the payment, its transition,
    /// journal, refund, attempt and idempotency record commit together. Side effects follow
    /// only an input the state machine accepts; a PSP fact it refuses (a refund that succeeded
    /// after a lost dispute, say) is kept as a payment exception for an operator, never dropped.
    async fn apply(
        &mut self,
        o: Outcome,
        attempt: Option<&Attempt>,
        cause: &str,
        status: u16,
        refund: Option<Refund>,
    ) -> Result<Reply, Halt> {
        let before = self.live.payment.clone();
        let mut next = self.next_version();
        if o.reference.is_some() && next.psp_reference.is_none() {
            // The PSP's reference is a fact whatever the state machine says: events find the
            // payment by it.
            next.psp_reference = o.reference.clone();
            next.client_secret = o.client_secret.clone();
        }
        let mut effects = Vec::new();
        let mut exceptions = Vec::new();
        let accepted = match o.input {
            None => true,
            Some(input) => match decide(&before.state, input) {
                Ok((state, e)) => {
                    next.state = state;
                    effects = e;
                    true
                }
                Err(r) => {
                    // The PSP's answer no longer moves this payment. A benign repeat (an
                    // authorization already taken) changes nothing; money the PSP moved that the
                    // payment cannot take is an exception.
                    tracing::warn!(payment_id = %before.id, ?input, rejection = %r, "PSP outcome refused by the state machine");
                    if unreflected_money(&before.state, &input) {
                        exceptions.push((
                            before.id.clone(),
                            format!(
                                "{cause}: the PSP reported {input:?}, which a {} payment cannot take ({r})",
                                before.status().as_str()
                            ),
                        ));
                    }
                    false
                }
            },
        };
        if accepted {
            next.next_action = o.next_action.clone();
            if o.failure.is_some() {
                next.failure = o.failure.clone();
            }
        }
        let refund = refund.map(|mut r| {
            if accepted {
                if let Some(s) = o.refund_status {
                    r.status = s;
                }
            }
            if r.psp_reference.is_none() && attempt.map(|a| matches!(a.op, PspOp::Refund { .. })).unwrap_or(false) {
                r.psp_reference = o.reference.clone();
            }
            r.updated_at = next.updated_at;
            r
        });
        let body = match &refund {
            Some(r) => reply_body(&r.to_object()),
            None => reply_body(&next.to_object()),
        };
        let mut commit = self.transition_commit(&before, &next, cause, Some((status, body.clone())));
        commit.attempt_finished = attempt.map(|a| (a.id.clone(), o.attempt));
        if let Some(x) = &o.exception {
            exceptions.push((before.id.clone(), x.clone()));
        }
        commit.exceptions = exceptions;
        let dispute = self.dispute.take().filter(|_| accepted);
        for e in effects {
            if let Effect::Journal { kind, amount } = e {
                let correlation = match (&refund, attempt) {
                    _ if dispute.is_some() => dispute.as_ref().map(|d| d.id.to_string()).unwrap_or_default(),
                    (Some(r), _) => r.id.to_string(),
                    (None, Some(a)) => a.id.to_string(),
                    (None, None) => format!("{cause}:{}", next.version),
                };
                commit.journal = Some(Journal {
                    kind,
                    correlation_id: correlation,
                    currency: next.currency,
                    entries: postings(kind, amount, &next.merchant_id, next.fee_bps, next.fee_fixed),
                });
            }
        }
        if let Some(r) = &refund {
            if accepted && o.refund_status.is_some() {
                commit.outbox.push(OutboxEvent {
                    event_type: format!("refund.{}", r.status.as_str()),
                    payload: r.to_object(),
                });
            }
            commit.refunds.push(r.clone());
        }
        if let Some(d) = dispute {
            commit.outbox.push(OutboxEvent {
                event_type: format!("dispute.{}", d.status.as_str()),
                payload: d.to_object(),
            });
            commit.disputes.push(d);
        }
        self.commit(next, commit).await?;
        if let Some(a) = attempt {
            self.live.open.retain(|x| x.id != a.id);
        }
        Ok(Reply {
            status,
            body,
            stored: self.idem.is_some(),
        })
    }

    /// A commit with the transition (if the status moved), its outbox event, and the idempotency
    /// record completed with `response`.
    fn transition_commit(
        &self,
        before: &Payment,
        next: &Payment,
        cause: &str,
        response: Option<(u16, Vec<u8>)>,
    ) -> Commit {
        let mut commit = Commit::default();
        if before.status() != next.status() {
            commit.transition = Some(Transition {
                seq: before.transitions,
                from: Some(before.status()),
                to: next.status(),
                cause: cause.to_owned(),
            });
            commit.outbox.push(OutboxEvent {
                event_type: format!("payment.{}", next.status().as_str()),
                payload: next.to_object(),
            });
        }
        commit.idempotency = self.idem.as_ref().map(|i| IdempotencyWrite {
            merchant_id: i.merchant.clone(),
            key: i.key.clone(),
            resource_id: None,
            response: response.clone(),
            fence: i.fence,
        });
        commit
    }

    /// The payment as the next commit will leave it: one version on, `transitions` counted
    /// by [`Flow::commit`].
    fn next_version(&self) -> Payment {
        let mut next = self.live.payment.clone();
        next.version += 1;
        next.updated_at = self.deps.clock.now();
        next
    }

    async fn commit(&mut self, mut next: Payment, mut commit: Commit) -> Result<(), Halt> {
        if commit.transition.is_some() {
            next.transitions += 1;
        }
        if commit.processed_event.is_none() {
            commit.processed_event = self.event.take();
        }
        commit.payment = Some(next.clone());
        let moved = commit
            .transition
            .as_ref()
            .map(|t| (t.from.map(Status::as_str).unwrap_or("none"), t.to.as_str()));
        // What this commit records of the outside world (a PSP answer, a PSP event) must land
        // even if the key was taken over; a commit that would only start something must not.
        let records_a_fact = commit.attempt_finished.is_some() || commit.processed_event.is_some();
        let retry = records_a_fact.then(|| Commit {
            idempotency: None,
            ..commit.clone()
        });
        match (self.deps.store.commit(commit).await, retry) {
            (Ok(()), _) => {}
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

    fn new_attempt_id(&self) -> AttemptId {
        AttemptId::from_trusted(format!("{}{}", AttemptId::PREFIX, self.deps.clock.unique()))
    }

    fn new_refund_id(&self) -> RefundId {
        RefundId::from_trusted(format!("{}{}", RefundId::PREFIX, self.deps.clock.unique()))
    }

    fn payment_reply(&self, status: u16) -> Reply {
        Reply {
            status,
            body: reply_body(&self.payment().to_object()),
            stored: false,
        }
    }

    /// The amount of a capture or refund: the one asked for, in the payment's currency, or `default`.
    fn amount_in_currency(&self, amount: Option<Money>, default: i64) -> Result<i64, ApiError> {
        match amount {
            None => Ok(default),
            Some(m) if m.currency != self.payment().currency => Err(ApiError::param(
                "amount.currency",
                "amount.currency must be the payment's currency",
            )),
            Some(m) => Ok(m.minor),
        }
    }
}

/// Whether a PSP outcome the state machine refused reports money (or a hold) that the
/// payment does not already reflect: those are exceptions. A repeat of what the payment
/// already knows (an authorization answer after the event that carried it) is not.
fn unreflected_money(state: &crate::domain::PaymentState, input: &Input) -> bool {
    match *input {
        Input::Authorized => matches!(state.status, Status::Failed | Status::Canceled),
        Input::Charged { amount } | Input::Captured { amount } => state.captured != amount,
        Input::RefundSucceeded { .. }
        | Input::RefundFailed { .. }
        | Input::DisputeOpened { .. }
        | Input::DisputeWon
        | Input::DisputeLost => true,
        _ => false,
    }
}

fn reply_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
