//! What a payment actor does with one message, as plain async code over owned state. The
//! actor runs it atomically (no other message starts until it ends), so nothing here needs a
//! lock. It follows DESIGN.md, "Calling the PSP safely": decide (pure), record the attempt,
//! call the PSP with a timeout, commit the outcome with its journal, outbox row and
//! idempotency record in one transaction, reply.

use std::time::Duration;

use serde_json::Value;

use super::payment::{IdemKey, Op, Reply};
use crate::adapters::nats::PspEvent;
use crate::adapters::postgres::commit::{
    AttemptOutcome, Commit, CommitError, IdempotencyWrite, OutboxEvent, ProcessedEvent, Transition,
};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::postgres::Db;
use crate::adapters::psp::{AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspRefund, PspRefundStatus};
use crate::domain::ledger::{postings, Journal};
use crate::domain::record::now;
use crate::domain::{
    decide, AttemptId, Dispute, DisputeId, DisputeStatus, Effect, Input, Money, NextAction, Payment, PspOp, Refund,
    RefundId, RefundStatus, Status,
};
use crate::error::ApiError;

/// What a payment actor needs from the world.
pub struct PaymentDeps {
    pub db: Db,
    /// Where every commit goes: the ledger shards' group commit.
    pub ledger: std::sync::Arc<crate::actors::ledger_shard::Ledger>,
    pub psp: std::sync::Arc<dyn Psp>,
    pub psp_timeout: Duration,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// A live payment: its committed state and the PSP attempts still without an outcome.
#[derive(Debug, Clone)]
pub struct Live {
    pub payment: Payment,
    pub open: Vec<Attempt>,
}

/// Why processing stopped early: an answer for the caller, and whether the actor's state can
/// no longer be trusted (a lost write race), so that it must reload from PostgreSQL.
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
            CommitError::Api(error) => Halt { error, stale: false },
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
    let mut flow = Flow {
        deps,
        live,
        idem,
        event: None,
        dispute: None,
    };
    let mut result = flow.execute(op.clone()).await;
    if matches!(result, Err(Halt { stale: true, .. })) {
        // Another writer moved the payment on. Reload it and run the operation once more: an
        // attempt this one recorded before losing the race is open in what we reload, and is
        // completed (and answered) by the open-attempt resolution, never sent twice.
        if let Ok(Some((payment, open))) = deps.db.load_payment(&id).await {
            tracing::info!(payment_id = %id, "reloaded after a lost write race");
            flow.live = Live { payment, open };
            result = flow.execute(op).await;
        }
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
        }
    }
}

impl<'a> Flow<'a> {
    fn payment(&self) -> &Payment {
        &self.live.payment
    }

    async fn execute(&mut self, op: Op) -> Result<Reply, Halt> {
        // A retry of a request whose PSP call was left open is answered by that call's outcome.
        match self.resolve_open_attempts(op.reply_status()).await? {
            Some(reply) => Ok(reply),
            None => self.run(op).await,
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
            id: AttemptId::generate(),
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
            id: AttemptId::generate(),
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
            id: AttemptId::generate(),
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
            let refund = self
                .deps
                .db
                .refunds_of_payment(&self.payment().id)
                .await?
                .into_iter()
                .find(|r| r.id == id);
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
        let at = now();
        let refund = Refund {
            id: RefundId::generate(),
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
            id: AttemptId::generate(),
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

    /// Applies a PSP event at most once (API.md's event table). An event that no longer moves
    /// the payment (it is already past it) is recorded and changes nothing: never backwards.
    async fn psp_event(&mut self, e: &PspEvent) -> Result<Reply, Halt> {
        if self.deps.db.event_processed(&e.provider, &e.event_id).await? {
            return Ok(Reply {
                status: 200,
                body: b"duplicate".to_vec(),
                stored: false,
            });
        }
        self.event = Some(ProcessedEvent {
            provider: e.provider.clone(),
            event_id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            raw: e.raw.clone(),
        });
        let object: Value = serde_json::from_slice(&e.object).unwrap_or(Value::Null);
        let status = self.payment().status();
        let cause = format!("psp.{}", e.event_type);
        let mut outcome = Outcome::recorded();
        let mut refund = None;
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
                outcome.input = Some(Input::AuthorizationFailed);
                outcome.failure = Some(crate::domain::Failure {
                    code: err["code"].as_str().unwrap_or("card_declined").to_owned(),
                    decline_code: err["decline_code"].as_str().map(str::to_owned),
                    message: err["message"].as_str().unwrap_or("The payment failed.").to_owned(),
                });
            }
            "payment_intent.canceled" => outcome.input = Some(Input::Canceled),
            "charge.refunded" | "charge.refund.updated" => {
                // A refund object itself, or a charge listing its refunds.
                let listed = if object["object"] == "refund" {
                    vec![object.clone()]
                } else {
                    object["refunds"]["data"].as_array().cloned().unwrap_or_default()
                };
                let pending = self.deps.db.refunds_of_payment(&self.payment().id).await?;
                let settled = pending
                    .into_iter()
                    .filter(|r| r.status == RefundStatus::Pending)
                    .find_map(|r| {
                        let psp = listed
                            .iter()
                            .find(|l| Some(l["id"].as_str().unwrap_or_default()) == r.psp_reference.as_deref())?;
                        let status = match psp["status"].as_str()? {
                            "succeeded" => PspRefundStatus::Succeeded,
                            "failed" | "canceled" => PspRefundStatus::Failed,
                            _ => return None,
                        };
                        Some((r, status))
                    });
                if let Some((r, s)) = settled {
                    let reference = r.psp_reference.clone().unwrap_or_default();
                    outcome = Outcome::of_refund(PspRefund { reference, status: s }, r.amount.minor);
                    refund = Some(r);
                }
            }
            "charge.dispute.created" => {
                let amount = object["amount"].as_i64().unwrap_or(self.payment().state.captured);
                let at = now();
                self.dispute = Some(Dispute {
                    id: DisputeId::generate(),
                    payment_id: self.payment().id.clone(),
                    merchant_id: self.payment().merchant_id.clone(),
                    psp_reference: object["id"].as_str().unwrap_or(&e.event_id).to_owned(),
                    amount: Money::new(amount, self.payment().currency),
                    status: DisputeStatus::NeedsResponse,
                    reason: object["reason"].as_str().map(str::to_owned),
                    created_at: at,
                    updated_at: at,
                });
                outcome.input = Some(Input::DisputeOpened { amount });
            }
            "charge.dispute.closed" => {
                let reference = object["id"].as_str().unwrap_or_default();
                if let Some(mut d) = self.deps.db.dispute_by_psp_reference(reference).await? {
                    let won = object["status"] == "won";
                    if matches!(d.status, DisputeStatus::NeedsResponse | DisputeStatus::UnderReview) {
                        d.status = if won { DisputeStatus::Won } else { DisputeStatus::Lost };
                        d.updated_at = now();
                        outcome.input = Some(if won { Input::DisputeWon } else { Input::DisputeLost });
                        self.dispute = Some(d);
                    }
                }
            }
            _ => {}
        }
        let reply = self.apply(outcome, None, &cause, 200, refund).await?;
        Ok(Reply { stored: false, ..reply })
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
                Some(id) => self
                    .deps
                    .db
                    .refunds_of_payment(&self.payment().id)
                    .await?
                    .into_iter()
                    .find(|r| &r.id == id),
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
                let saved = self.idem.take();
                let r = self.perform(attempt, "recovery", status, refund).await;
                self.idem = saved;
                r?;
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
        let answer = tokio::time::timeout(self.deps.psp_timeout, call).await;
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
    /// journal, refund, attempt and idempotency record commit together.
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
            next.psp_reference = o.reference.clone();
            next.client_secret = o.client_secret.clone();
        }
        next.next_action = o.next_action.clone();
        if o.failure.is_some() {
            next.failure = o.failure.clone();
        }
        let mut effects = Vec::new();
        if let Some(input) = o.input {
            match decide(&before.state, input) {
                Ok((state, e)) => {
                    next.state = state;
                    effects = e;
                }
                // The PSP's answer no longer moves this payment (it is already past it).
                Err(r) => tracing::info!(payment_id = %before.id, ?input, rejection = %r, "outcome ignored"),
            }
        }
        let refund = refund.map(|mut r| {
            if let Some(s) = o.refund_status {
                r.status = s;
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
        let dispute = self.dispute.take();
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
            commit.outbox.push(OutboxEvent {
                event_type: format!("refund.{}", r.status.as_str()),
                payload: r.to_object(),
            });
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
        });
        commit
    }

    /// The payment as the next commit will leave it: one version on, `transitions` counted
    /// by [`Flow::commit`].
    fn next_version(&self) -> Payment {
        let mut next = self.live.payment.clone();
        next.version += 1;
        next.updated_at = now();
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
        self.deps.ledger.commit(commit).await?;
        if let Some((from, to)) = moved {
            self.deps.metrics.transition(from, to);
        }
        self.live.payment = next;
        Ok(())
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

fn reply_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
