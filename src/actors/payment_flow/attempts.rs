//! PSP attempts: the call (with the attempt id as the PSP's idempotency key), the outcome
//! committed with its journal, and the recovery of attempts an earlier message left open.

use super::{payment_object, reply_body, Flow, Halt};
use crate::actors::error::PaymentError;
use crate::actors::payment::Reply;
use crate::adapters::postgres::commit::{AttemptOutcome, OutboxEvent};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::psp::connector::Connector;
use crate::adapters::psp::{AuthorizeRequest, Intent, IntentStatus, PspError, PspRefund, PspRefundStatus};
use crate::domain::ledger::{postings, Journal};
use crate::domain::risk::RiskAction;
use crate::domain::{decide, CaptureStrategy, Effect, Input, Money, NextAction, PspOp, Refund, RefundStatus, Status};

/// What the PSP's answer means for the state machine, and what it changes besides.
pub(super) struct Outcome {
    pub(super) input: Option<Input>,
    pub(super) attempt: AttemptOutcome,
    pub(super) reference: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) next_action: Option<NextAction>,
    pub(super) failure: Option<crate::domain::Failure>,
    pub(super) refund_status: Option<RefundStatus>,
    /// A PSP fact to keep for an operator.
    pub(super) exception: Option<String>,
}

impl Outcome {
    /// A payment a rule held for review is only authorized until the merchant decides: an
    /// authorization the PSP reports, whether in its answer to the call or when it is read again
    /// after 3-D Secure, holds the payment for review instead.
    pub(super) fn held_if_reviewed(mut self, risk: Option<RiskAction>) -> Outcome {
        if risk == Some(RiskAction::Review) && self.input == Some(Input::Authorized) {
            self.input = Some(Input::HeldForReview);
        }
        self
    }

    pub(super) fn of_intent(intent: Intent, op: PspOp) -> Outcome {
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
            (IntentStatus::CaptureReceived { amount }, PspOp::Capture { .. }) => {
                // Decided later, by the PSP's event: the attempt is done, the payment waits.
                o.attempt = AttemptOutcome::Pending;
                o.input = Some(Input::CaptureReceived { amount });
            }
            (IntentStatus::CaptureReceived { .. }, _) => {}
            (IntentStatus::Processing, PspOp::Authorize) => {
                // Decided by the PSP's event: the attempt is done (nothing resends it), and the
                // payment, `processing`, takes no second confirm meanwhile.
                o.attempt = AttemptOutcome::Pending;
                o.input = Some(Input::AuthorizationPending);
            }
            (IntentStatus::Processing, _) => {}
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
    pub(super) fn recorded() -> Outcome {
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

    pub(super) fn of_refund(refund: PspRefund, amount: i64) -> Outcome {
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

/// Hours after which an open Stripe attempt is not sent again: Stripe forgets an idempotency
/// key after 24 hours.
const STRIPE_KEY_HOURS: i64 = 23;

/// How a PSP call ended when it gave no usable answer.
pub(super) enum Called {
    /// Provably nothing reached the PSP.
    NotSent(String),
    Halt(Halt),
}

impl From<Halt> for Called {
    fn from(h: Halt) -> Called {
        Called::Halt(h)
    }
}

impl Flow<'_> {
    /// The answer for a key whose PSP attempt already ended: the resource as it stands.
    pub(super) async fn answer_finished(
        &mut self,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        status: u16,
    ) -> Result<Reply, Halt> {
        if outcome == AttemptOutcome::Rejected {
            return Err(PaymentError::PspRefused {
                code: "psp_request_invalid",
                message: "the PSP refused this request; nothing was charged or refunded".into(),
                param: None,
            }
            .into());
        }
        match &attempt.refund_id {
            Some(id) => {
                let refund = self.deps.store.refund(&self.payment().id, id).await?;
                let refund = refund.ok_or(PaymentError::NotFound("refund"))?;
                Ok(Reply {
                    status,
                    body: reply_body(&refund.to_object()),
                    stored: false,
                })
            }
            None => Ok(self.payment_reply(status)),
        }
    }

    /// Completes what an earlier message or incarnation started: an attempt recorded but
    /// without an outcome is sent again with the same idempotency key, and its answer applied.
    /// The answer to the attempt the current request's own key started is returned, rendered
    /// with `status`, and completes that key's record.
    pub(super) async fn resolve_open_attempts(&mut self, status: u16) -> Result<Option<Reply>, Halt> {
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
                    Err(h) if h.stale || still_open || h.error.is_transient() => return Err(h),
                    Err(h) => {
                        tracing::info!(payment_id = %self.payment().id, error = %h.error, "an earlier request's attempt ended refused")
                    }
                }
            }
        }
        Ok(own)
    }

    /// Calls the PSP for `attempt` and commits what it answers. A new authorization that
    /// provably reached no PSP, or that was softly declined, goes on to the next connector
    /// first ([`Flow::fail_over`]).
    pub(super) async fn perform(
        &mut self,
        mut attempt: Attempt,
        cause: &str,
        status: u16,
        refund: Option<Refund>,
    ) -> Result<Reply, Halt> {
        let answer = loop {
            if attempt.op == PspOp::Authorize && self.unsent.as_ref() != Some(&attempt.id) {
                // Sending an authorization again (a retry, a recovery) is claimed by a commit
                // first. A failover closes an attempt as "never reached the PSP" only on the
                // strength of its first send; the claim moves the payment's version, so that
                // closing (fenced by the version it read) cannot land once anyone else may
                // have sent the attempt, and a claim cannot land once it is closed
                // (docs/DESIGN.md, "Routing and failover").
                let next = self.next_version();
                self.commit(next, crate::adapters::postgres::commit::Commit::default())
                    .await?;
            }
            let answer = self.call_attempt(&attempt).await;
            match self.fail_over(&attempt, &answer).await? {
                Some(next) => attempt = next,
                None => break answer,
            }
        };
        let outcome = match answer {
            Ok(o) => o,
            Err(Called::NotSent(e)) => {
                // Nothing reached the PSP and nothing is left to try: the attempt is closed and
                // the request may be made again.
                tracing::warn!(payment_id = %self.payment().id, error = %e, "no connector could be reached");
                self.close_untouched(&attempt, AttemptOutcome::Unreachable, cause, status, refund)
                    .await?;
                return Err(PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into());
            }
            Err(Called::Halt(Halt {
                error: PaymentError::PspRefused { code, message, param },
                ..
            })) => {
                // The PSP refused the request: nothing happened there.
                self.close_untouched(&attempt, AttemptOutcome::Rejected, cause, status, refund)
                    .await?;
                return Err(PaymentError::PspRefused { code, message, param }.into());
            }
            Err(Called::Halt(h)) => return Err(h),
        };
        self.apply(outcome, Some(&attempt), cause, status, refund).await
    }

    /// Closes an attempt with which nothing happened at a PSP (refused, or never reached); a
    /// refund it carried gives its amount back. The request's own answer is its error, so the
    /// commit does not complete its idempotency record.
    async fn close_untouched(
        &mut self,
        attempt: &Attempt,
        closed: AttemptOutcome,
        cause: &str,
        status: u16,
        refund: Option<Refund>,
    ) -> Result<(), Halt> {
        let o = Outcome {
            input: match attempt.op {
                PspOp::Refund { amount } => Some(Input::RefundFailed { amount }),
                _ => None,
            },
            attempt: closed,
            reference: None,
            client_secret: None,
            next_action: None,
            failure: None,
            refund_status: refund.as_ref().map(|_| RefundStatus::Failed),
            exception: None,
        };
        // The close is not the request's answer, so it carries no key; the key comes back
        // however the commit ends: a commit of unknown fate re-runs the request, which must
        // still find its attempts by their key (without it, it would start another under a key
        // of its own, and answer for neither).
        let saved = self.idem.take();
        let applied = self.apply(o, Some(attempt), cause, status, refund).await;
        self.idem = saved;
        applied.map(|_| ())
    }

    /// One call of `attempt` to its connector. `NotSent` only for the first send of an
    /// authorization this message started: any other call that reached no PSP still leaves
    /// the attempt open (an earlier send of it may have reached one).
    async fn call_attempt(&mut self, attempt: &Attempt) -> Result<Outcome, Called> {
        let p = self.payment().clone();
        let connector = self.connector_of(attempt.connector_id.as_deref()).await?;
        let psp = &connector.psp;
        let risk = p.risk.as_ref().map(|r| r.outcome);
        let reference = || p.psp_reference.clone().unwrap_or_default();
        let first_send = self.unsent.take().is_some_and(|id| id == attempt.id);
        // Stripe keeps a key's answer for 24 hours; after that the same key is a new request
        // there, and a resend could act a second time. An attempt that old is left to an
        // operator (docs/OPERATIONS.md, "Connectors and routing"), never sent again.
        let too_old = attempt
            .started_at
            .is_some_and(|at| self.deps.clock.now() - at > chrono::Duration::hours(STRIPE_KEY_HOURS));
        if !first_send && connector.kind == "stripe" && too_old {
            tracing::error!(payment_id = %p.id, attempt = %attempt.id, connector = %connector.id,
                "an open Stripe attempt is past Stripe's idempotency window: not sent again; an operator must resolve it");
            self.deps.metrics.psp_error(connector.kind, "idempotency_window_passed");
            return Err(Called::Halt(
                PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into(),
            ));
        }
        let answer = match attempt.op {
            PspOp::Authorize => {
                let req = AuthorizeRequest {
                    key: attempt.id.clone(),
                    payment_id: p.id.clone(),
                    merchant_id: p.merchant_id.clone(),
                    amount: p.amount(),
                    payment_method: p.payment_method.clone(),
                    // A payment held for review is only authorized until the merchant decides.
                    capture: match risk {
                        Some(RiskAction::Review) => CaptureStrategy::Manual,
                        _ => p.capture_strategy,
                    },
                    three_d_secure: risk == Some(RiskAction::RequestThreeDs),
                };
                self.call(&connector, "authorize", psp.authorize(req))
                    .await
                    .map(|i| Outcome::of_intent(i, attempt.op).held_if_reviewed(risk))
            }
            PspOp::Capture { amount } => self
                .call(
                    &connector,
                    "capture",
                    psp.capture(attempt.id.clone(), reference(), Money::new(amount, p.currency)),
                )
                .await
                .map(|i| Outcome::of_intent(i, attempt.op)),
            PspOp::Cancel => self
                .call(&connector, "cancel", psp.cancel(attempt.id.clone(), reference()))
                .await
                .map(|i| Outcome::of_intent(i, attempt.op)),
            PspOp::Refund { amount } => self
                .call(
                    &connector,
                    "refund",
                    psp.refund(attempt.id.clone(), reference(), Money::new(amount, p.currency)),
                )
                .await
                .map(|r| Outcome::of_refund(r, amount)),
        };
        match answer {
            Err(Called::NotSent(e)) if !(first_send && attempt.op == PspOp::Authorize) => {
                tracing::warn!(payment_id = %p.id, error = %e, "PSP not reached; the attempt stays open");
                Err(Called::Halt(
                    PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into(),
                ))
            }
            other => other,
        }
    }

    /// Whether an authorization's answer sends it on to the next connector: a failure that
    /// reached no PSP (only on its first send), or a soft decline (once per message). The
    /// attempt is closed, a new one started on the next connector in one commit, and returned.
    /// Never for an ambiguous answer (a timeout after sending): that attempt stays open.
    async fn fail_over(
        &mut self,
        attempt: &Attempt,
        answer: &Result<Outcome, Called>,
    ) -> Result<Option<Attempt>, Halt> {
        if attempt.op != PspOp::Authorize || self.fallbacks.is_empty() {
            return Ok(None);
        }
        let (outcome, failure, why) = match answer {
            Err(Called::NotSent(_)) => (AttemptOutcome::Unreachable, None, "unreachable"),
            Ok(o)
                if !self.soft_retried
                    && o.attempt == AttemptOutcome::Failed
                    && o.failure.as_ref().is_some_and(|f| self.deps.connectors.soft_decline(f)) =>
            {
                self.soft_retried = true;
                (AttemptOutcome::Failed, o.failure.clone(), "soft_decline")
            }
            _ => return Ok(None),
        };
        let connector = self.fallbacks.remove(0);
        let rule = self
            .payment()
            .routing
            .as_ref()
            .map(|r| r.rule.clone())
            .unwrap_or_else(|| "default".into());
        let mut next = self.next_version();
        if let Some(r) = next.routing.as_mut() {
            r.finished(
                attempt.id.as_str(),
                outcome.as_str(),
                failure.as_ref().map(|f| f.decline_code.as_deref().unwrap_or(&f.code)),
            );
        }
        let mut retry = Attempt {
            id: self.new_attempt_id(),
            op: PspOp::Authorize,
            refund_id: None,
            idem_key: attempt.idem_key.clone(),
            connector_id: None,
            started_at: Some(self.deps.clock.now()),
        };
        self.route_to(&mut next, &mut retry, connector.clone(), rule).await?;
        tracing::info!(payment_id = %next.id, from = ?attempt.connector_id, to = %connector, why, "authorization failed over");
        self.deps.metrics.psp_failover(why);
        let commit = crate::adapters::postgres::commit::Commit {
            attempt_started: Some(retry.clone()),
            attempt_finished: Some((attempt.id.clone(), outcome)),
            // The declined intent's reference stays on its attempt, not on the payment: its
            // events find the payment through it and change nothing.
            attempt_reference: answer.as_ref().ok().and_then(|o| o.reference.clone()),
            ..Default::default()
        };
        self.commit(next, commit).await?;
        self.live.open.retain(|x| x.id != attempt.id);
        self.live.open.push(retry.clone());
        Ok(Some(retry))
    }

    /// The connector an attempt (or the payment, for `None`) goes to.
    pub(super) async fn connector_of(&self, id: Option<&str>) -> Result<std::sync::Arc<Connector>, Halt> {
        let id = id.or(self.payment().routing.as_ref().map(|r| r.connector_id.as_str()));
        match self.deps.connectors.get(&self.payment().merchant_id, id).await? {
            Some(c) => Ok(c),
            None => {
                tracing::error!(payment_id = %self.payment().id, connector = ?id, "the payment's connector is gone");
                Err(PaymentError::Unavailable(crate::actors::error::CONNECTOR_UNAVAILABLE).into())
            }
        }
    }

    /// A PSP call through `connector`'s breaker, with the timeout, counted in `/metrics`.
    async fn call<T>(
        &self,
        connector: &Connector,
        operation: &'static str,
        call: crate::adapters::psp::PspFuture<'_, T>,
    ) -> Result<T, Called> {
        let psp = connector.kind;
        if !connector.allow() {
            self.deps.metrics.psp_error(psp, "breaker_open");
            return Err(Called::NotSent(format!(
                "connector {}: circuit breaker open",
                connector.id
            )));
        }
        let started = std::time::Instant::now();
        let answer = match self.deps.psp_timeout {
            Some(limit) => tokio::time::timeout(limit, call).await,
            None => Ok(call.await),
        };
        self.deps.metrics.psp_call(psp, operation, started.elapsed());
        match &answer {
            Ok(Ok(_)) => {}
            Ok(Err(PspError::Invalid { .. })) => self.deps.metrics.psp_error(psp, "invalid_request"),
            Ok(Err(PspError::Unavailable(_))) => self.deps.metrics.psp_error(psp, "unavailable"),
            Ok(Err(PspError::NotSent(_))) => self.deps.metrics.psp_error(psp, "not_sent"),
            Err(_) => self.deps.metrics.psp_error(psp, "timeout"),
        }
        let change = connector.record(matches!(answer, Ok(Ok(_)) | Ok(Err(PspError::Invalid { .. }))));
        if change.opened || change.closed {
            tracing::warn!(connector = %connector.id, psp, opened = change.opened, "circuit breaker changed");
        }
        self.deps.metrics.psp_breaker(psp, change);
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(PspError::Invalid { code, message, param })) => {
                let code: &'static str = match code.as_str() {
                    "resource_missing" => "resource_missing",
                    "amount_too_large" => "amount_too_large",
                    _ => "psp_request_invalid",
                };
                Err(Called::Halt(PaymentError::PspRefused { code, message, param }.into()))
            }
            Ok(Err(PspError::NotSent(e))) => Err(Called::NotSent(e)),
            Ok(Err(PspError::Unavailable(e))) => {
                tracing::warn!(payment_id = %self.payment().id, error = %e, "PSP unavailable");
                Err(Called::Halt(
                    PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into(),
                ))
            }
            Err(_) => {
                tracing::warn!(payment_id = %self.payment().id, "PSP call timed out");
                Err(Called::Halt(
                    PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into(),
                ))
            }
        }
    }

    /// [`Flow::call`] for a call that is not an attempt (a retrieve): every failure halts.
    pub(super) async fn call_psp<T>(
        &self,
        connector: &Connector,
        operation: &'static str,
        call: crate::adapters::psp::PspFuture<'_, T>,
    ) -> Result<T, Halt> {
        self.call(connector, operation, call).await.map_err(|e| match e {
            Called::Halt(h) => h,
            Called::NotSent(_) => PaymentError::Unavailable(crate::actors::error::PSP_UNAVAILABLE).into(),
        })
    }

    /// Applies a PSP outcome: the state machine decides, and the payment, its transition,
    /// journal, refund, attempt and idempotency record commit together. Side effects follow
    /// only an input the state machine accepts; a PSP fact it refuses (a refund that succeeded
    /// after a lost dispute, say) is kept as a payment exception for an operator, never dropped.
    pub(super) async fn apply(
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
        if accepted && o.input.is_some() {
            // Only an input the state machine took moves what the customer is asked to do
            // next: news with no input (a type payrail does not act on, a fact about an intent
            // the payment left behind) must not take away a 3-D Secure redirect.
            next.next_action = o.next_action.clone().map(Box::new);
            if o.failure.is_some() {
                next.failure = o.failure.clone().map(Box::new);
            }
        }
        if let (Some(a), Some(r)) = (attempt, next.routing.as_mut()) {
            let code = o.failure.as_ref().map(|f| f.decline_code.as_deref().unwrap_or(&f.code));
            r.finished(a.id.as_str(), o.attempt.as_str(), code);
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
        // The journal first: a split payment's journal brings its splits up to date, and the
        // payment's event carries them.
        let mut journal = None;
        for e in &effects {
            if let Effect::Journal { kind, amount } = *e {
                let correlation = match (&refund, attempt) {
                    _ if self.dispute.is_some() => self.dispute.as_ref().map(|d| d.id.to_string()).unwrap_or_default(),
                    (Some(r), _) => r.id.to_string(),
                    (None, Some(a)) => a.id.to_string(),
                    (None, None) => format!("{cause}:{}", next.version),
                };
                let merchant = next.merchant_id.clone();
                let (payment_amount, fee_bps, fee_fixed) = (next.state.amount, next.fee_bps, next.fee_fixed);
                let entries = match next.splits.as_mut() {
                    None => postings(kind, amount, &merchant, fee_bps, fee_fixed),
                    Some(splits) => {
                        let share = refund
                            .as_ref()
                            .map(|r| (r.reverse_splits, r.refund_application_fee))
                            .unwrap_or((true, false));
                        splits
                            .postings(kind, amount, payment_amount, &merchant, fee_bps, fee_fixed, share)
                            .ok_or_else(|| {
                                tracing::error!(payment_id = %next.id, ?kind, amount, "a split payment's journal could not be shared");
                                PaymentError::Store(crate::adapters::postgres::StoreError::Broken)
                            })?
                    }
                };
                journal = Some(Journal {
                    kind,
                    correlation_id: correlation,
                    currency: next.currency,
                    entries,
                });
            }
        }
        // Nothing of the payment moved and no attempt ends (a PSP event about what it already
        // knows): it keeps its version and is not written again. An attempt's end still moves
        // the version, so that a stale incarnation of the actor learns of it.
        if attempt.is_none()
            && before.version > 1
            && journal.is_none()
            && next.state == before.state
            && before.differs_only_in_state(&next)
        {
            next = before.clone();
        }
        // The payment's object, serialized once for the answer and for its event. A PSP event's
        // answer is read by no one (only its status): no body unless a key stores it.
        let object = match (&refund, self.event.is_some() && self.idem.is_none()) {
            (None, false) => Some(payment_object(&next)),
            _ => None,
        };
        let body = match (&refund, &object) {
            (Some(r), _) => reply_body(&r.to_object()),
            (None, Some(o)) => o.get().as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        let mut commit = self.transition_commit_with(&before, &next, cause, Some((status, body.clone())), object);
        commit.journal = journal;
        commit.attempt_finished = attempt.map(|a| (a.id.clone(), o.attempt));
        if let Some(x) = &o.exception {
            exceptions.push((before.id.clone(), x.clone()));
        }
        commit.exceptions = exceptions;
        let dispute = self.dispute.take().filter(|_| accepted);
        if let Some(r) = &refund {
            if accepted && o.refund_status.is_some() {
                commit.outbox.push(OutboxEvent::new(
                    format!("refund.{}", r.status.as_str()),
                    &r.to_object(),
                ));
            }
            commit.refunds.push(r.clone());
        }
        if let Some(d) = dispute {
            commit.outbox.push(OutboxEvent::new(
                format!("dispute.{}", d.status.as_str()),
                &d.to_object(),
            ));
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
