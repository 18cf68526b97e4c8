//! The merchant's operations on a payment: each decides with the state machine, records the
//! PSP attempt it needs, and hands it to `Flow::perform`.

use super::attempts::Outcome;
use super::{payment_object, reply_body, Flow, Halt};
use crate::actors::error::PaymentError;
use crate::actors::payment::Reply;
use crate::adapters::postgres::commit::{Commit, IdempotencyWrite, OutboxEvent, Transition};
use crate::adapters::postgres::payments::Attempt;
use crate::adapters::psp::PspError;
use crate::domain::risk::{CardSignals, RiskAction, RiskDecision};
use crate::domain::{
    decide, CaptureStrategy, Effect, Failure, Input, Money, Payment, PspOp, Refund, RefundId, RefundStatus, Rejection,
    Status,
};

impl Flow<'_> {
    /// What the PSP's tokenizer knows of the card, and the risk rules' decision on the payment
    /// as it would be authorized (the attempt is counted for velocity).
    async fn assess(&self, payment: &Payment) -> Result<(Option<CardSignals>, RiskDecision), Halt> {
        let card = match self.deps.psp.card(&payment.merchant_id, &payment.payment_method).await {
            Ok(card) => card,
            // An unknown token: the PSP refuses the authorization itself, with its own answer.
            Err(PspError::Invalid { .. }) => None,
            Err(PspError::Unavailable(_) | PspError::NotSent(_)) => return Err(PaymentError::Unavailable("psp").into()),
        };
        let mut assessed = payment.clone();
        assessed.card = card.clone().map(Box::new);
        let decision = self.deps.risk.assess(&assessed, card.as_ref()).await?;
        self.deps.metrics.risk_decision(decision.outcome.as_str());
        if decision.outcome != RiskAction::Allow {
            tracing::info!(payment_id = %payment.id, outcome = decision.outcome.as_str(), rule = ?decision.rule, score = decision.score, "risk rule decided");
        }
        Ok((card, decision))
    }

    /// A rule blocked the payment: it fails without a PSP call, `failure.code = "blocked"`.
    async fn block(&mut self, mut next: Payment, status: u16) -> Result<Reply, Halt> {
        let (state, _) = decide(&self.payment().state, Input::AuthorizationFailed)
            .map_err(|r| PaymentError::rejected(r, "payment_method"))?;
        let rule = next.risk.as_ref().and_then(|r| r.rule.clone()).unwrap_or_default();
        next.state = state;
        next.failure = Some(Box::new(Failure {
            code: "blocked".into(),
            decline_code: None,
            message: format!("The payment was blocked by the risk rule {rule}."),
        }));
        let body = reply_body(&next.object());
        let commit = self.transition_commit(
            &self.live.payment.clone(),
            &next,
            "risk.block",
            Some((status, body.clone())),
        );
        self.commit(next, commit).await?;
        Ok(Reply {
            status,
            body,
            stored: self.idem.is_some(),
        })
    }

    /// The merchant approves a payment held for review: it is authorized like any other, and
    /// with automatic capture it is captured now.
    pub(super) async fn approve(&mut self) -> Result<Reply, Halt> {
        let capture = self.payment().capture_strategy == CaptureStrategy::Automatic;
        let reviewed = self
            .payment()
            .risk
            .as_ref()
            .is_some_and(|r| r.outcome == RiskAction::Review);
        // This key's approval may have landed without its capture: a takeover of the key (the
        // first request stopped between the two commits), or this message's own approval, which
        // landed (its capture's commit then failed and the payment was reloaded) or may have (its
        // commit unanswered). Not any reload: an approval that lost a race (`Stale`) did not land.
        let ours = self.idem.as_ref().is_some_and(|i| i.fence > 1) || self.approved_here;
        if ours && capture && reviewed && self.payment().state.status == Status::Authorized {
            // Go on with the capture the request promised, rather than refuse the approval it
            // made.
            return self.capture(None).await;
        }
        let (state, _) =
            decide(&self.payment().state, Input::Approve).map_err(|r| PaymentError::rejected(r, "payment"))?;
        let mut next = self.next_version();
        next.state = state;
        let body = reply_body(&next.object());
        let response = (!capture).then(|| (200, body.clone()));
        let commit = self.transition_commit(&self.live.payment.clone(), &next, "api.approve", response);
        let committed = self.commit(next, commit).await;
        if committed.is_ok() || matches!(&committed, Err(h) if matches!(h.error, PaymentError::Store(_))) {
            // Landed, or its fate unknown: after a reload, a payment authorized is this approval's.
            self.approved_here = true;
        }
        committed?;
        if capture {
            return self.capture(None).await;
        }
        Ok(Reply {
            status: 200,
            body,
            stored: self.idem.is_some(),
        })
    }

    /// The merchant rejects it: the authorization is canceled at the PSP.
    pub(super) async fn reject(&mut self) -> Result<Reply, Halt> {
        decide(&self.payment().state, Input::Reject).map_err(|r| PaymentError::rejected(r, "payment"))?;
        let attempt = self.new_attempt(PspOp::Cancel, None);
        let next = self.next_version();
        self.start(next, Commit::default(), attempt, "api.reject", 200, None)
            .await
    }

    /// A PSP attempt for this request: its id is the idempotency key the PSP will receive. It
    /// goes to the connector that authorized the payment (an authorization's is set by
    /// [`Flow::routed_attempt`]).
    fn new_attempt(&self, op: PspOp, refund_id: Option<RefundId>) -> Attempt {
        Attempt {
            id: self.new_attempt_id(),
            op,
            refund_id,
            idem_key: self.idem_key(),
            connector_id: self.payment().routing.as_ref().map(|r| r.connector_id.clone()),
            started_at: Some(self.deps.clock.now()),
        }
    }

    /// A new authorization attempt, routed (docs/API.md, "Routing"): to the first connector the
    /// merchant's rules choose for `next` (whose card is known by now); the others are this
    /// message's fallbacks. `next` records the choice.
    async fn routed_attempt(&mut self, next: &mut Payment) -> Result<Attempt, Halt> {
        let decision = self.deps.connectors.route(next).await?;
        let Some(decision) = decision else {
            return Err(PaymentError::PspRefused {
                code: "no_eligible_connector",
                message: format!("no enabled connector of this merchant takes {}", next.currency.code()),
                param: Some("amount.currency".into()),
            }
            .into());
        };
        let mut order = decision.connectors.into_iter();
        let first = order.next().ok_or(PaymentError::Unavailable("routing"))?;
        self.fallbacks = order.collect();
        self.soft_retried = false;
        let mut attempt = self.new_attempt(PspOp::Authorize, None);
        self.route_to(next, &mut attempt, first, decision.rule).await?;
        Ok(attempt)
    }

    /// Points `attempt` (an authorization this message has not sent yet) at `connector`, and
    /// notes it on `next`.
    pub(super) async fn route_to(
        &mut self,
        next: &mut Payment,
        attempt: &mut Attempt,
        connector: String,
        rule: String,
    ) -> Result<(), Halt> {
        let found = self.deps.connectors.get(&next.merchant_id, Some(&connector)).await?;
        let kind = found.ok_or(PaymentError::Unavailable("connector"))?.kind;
        let mut routing = next.routing.take().map(|r| *r).unwrap_or(crate::domain::Routing {
            connector_id: String::new(),
            rule: String::new(),
            attempts: Vec::new(),
        });
        routing.started(attempt.id.as_str(), "authorize", &connector);
        routing.connector_id = connector.clone();
        routing.rule = rule;
        next.routing = Some(Box::new(routing));
        next.psp = kind.to_owned();
        attempt.connector_id = Some(connector);
        self.unsent = Some(attempt.id.clone());
        Ok(())
    }

    /// docs/DESIGN.md, "Calling the PSP safely": the attempt commits (with whatever `commit`
    /// already holds) before the PSP hears of it; then it is performed.
    async fn start(
        &mut self,
        mut next: Payment,
        mut commit: Commit,
        attempt: Attempt,
        cause: &str,
        status: u16,
        refund: Option<Refund>,
    ) -> Result<Reply, Halt> {
        // An authorization was noted on the payment when it was routed; the others here.
        if let (Some(r), Some(c)) = (next.routing.as_mut(), attempt.connector_id.as_deref()) {
            if attempt.op != PspOp::Authorize {
                r.started(attempt.id.as_str(), attempt.operation().0, c);
            }
        }
        commit.attempt_started = Some(attempt.clone());
        self.commit(next, commit).await?;
        self.live.open.push(attempt.clone());
        self.perform(attempt, cause, status, refund).await
    }

    /// Stores the new payment with its audit trail's first row, its `payment.created` event and
    /// its idempotency record (which names it, so a retry finds it); with `confirm`, the
    /// authorization attempt commits in the same transaction and is performed at once.
    pub(super) async fn create(&mut self, confirm: bool) -> Result<Reply, Halt> {
        if !self.fresh {
            // Reloaded after a commit whose fate was unknown, and it had landed: go on from it.
            return match confirm {
                true => self.confirm(None, true).await,
                false => Ok(self.payment_reply(201)),
            };
        }
        let mut payment = self.live.payment.clone();
        payment.version = 1;
        payment.transitions = 0;
        let mut blocked = false;
        if confirm {
            let (card, decision) = self.assess(&payment).await?;
            blocked = decision.outcome == RiskAction::Block;
            payment.card = card.map(Box::new);
            payment.risk = Some(Box::new(decision));
        }
        let created = payment_object(&payment);
        let object = created.get().as_bytes().to_vec();
        let mut commit = Commit {
            transition: Some(Transition {
                seq: 0,
                from: None,
                to: Status::Pending,
                cause: "api.create".into(),
            }),
            outbox: vec![OutboxEvent {
                event_type: "payment.created".into(),
                payload: created,
            }],
            ..Commit::default()
        };
        commit.idempotency = self.idem.as_ref().map(|i| IdempotencyWrite {
            merchant_id: i.merchant.clone(),
            key: i.key.clone(),
            resource_id: Some(payment.id.to_string()),
            response: (!confirm).then(|| (201, object.clone())),
            fence: i.fence,
            claim: i.claim.clone(),
        });
        let attempt = match confirm && !blocked {
            true => Some(self.routed_attempt(&mut payment).await?),
            false => None,
        };
        commit.attempt_started = attempt.clone();
        self.commit(payment, commit).await?;
        self.fresh = false;
        if blocked {
            let next = self.next_version();
            return self.block(next, 201).await;
        }
        match attempt {
            None => Ok(Reply {
                status: 201,
                body: object,
                stored: self.idem.is_some(),
            }),
            Some(attempt) => {
                self.live.open.push(attempt.clone());
                self.perform(attempt, "api.confirm", 201, None).await
            }
        }
    }

    pub(super) async fn confirm(&mut self, payment_method: Option<String>, created: bool) -> Result<Reply, Halt> {
        let status = if created { 201 } else { 200 };
        // A create retried after a crash finds its confirm already done: report where it stands.
        if created && self.payment().status() != Status::Pending {
            return Ok(self.payment_reply(status));
        }
        let (_, effects) =
            decide(&self.payment().state, Input::Confirm).map_err(|r| PaymentError::rejected(r, "amount"))?;
        debug_assert_eq!(effects, vec![Effect::Psp(PspOp::Authorize)]);
        let mut next = self.next_version();
        if let Some(pm) = payment_method {
            next.payment_method = pm;
        }
        // The merchant's risk rules decide before the PSP hears of the payment.
        let (card, decision) = self.assess(&next).await?;
        let blocked = decision.outcome == RiskAction::Block;
        next.card = card.map(Box::new);
        next.risk = Some(Box::new(decision));
        if blocked {
            return self.block(next, status).await;
        }
        let attempt = self.routed_attempt(&mut next).await?;
        self.start(next, Commit::default(), attempt, "api.confirm", status, None)
            .await
    }

    pub(super) async fn capture(&mut self, amount: Option<Money>) -> Result<Reply, Halt> {
        let amount = self.amount_in_currency(amount, self.payment().state.capturable)?;
        let (_, effects) = decide(&self.payment().state, Input::Capture { amount })
            .map_err(|r| PaymentError::rejected(r, "amount.value"))?;
        debug_assert_eq!(effects, vec![Effect::Psp(PspOp::Capture { amount })]);
        let attempt = self.new_attempt(PspOp::Capture { amount }, None);
        let next = self.next_version();
        self.start(next, Commit::default(), attempt, "api.capture", 200, None)
            .await
    }

    pub(super) async fn cancel(&mut self) -> Result<Reply, Halt> {
        let (state, effects) =
            decide(&self.payment().state, Input::Cancel).map_err(|r| PaymentError::rejected(r, "amount"))?;
        if effects.is_empty() {
            // Nothing reached the PSP yet: the cancel is ours alone.
            let mut next = self.next_version();
            next.state = state;
            let body = reply_body(&next.object());
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
        let attempt = self.new_attempt(PspOp::Cancel, None);
        let next = self.next_version();
        self.start(next, Commit::default(), attempt, "api.cancel", 200, None)
            .await
    }

    pub(super) async fn refund(
        &mut self,
        amount: Option<Money>,
        reason: Option<String>,
        resume: Option<RefundId>,
        share: crate::actors::payment::RefundShare,
    ) -> Result<Reply, Halt> {
        if let Some(id) = resume {
            // The first request with this key created the refund and then died; the open
            // attempts are resolved by now, so report the refund as it stands.
            let refund = self.deps.store.refund(&self.payment().id, &id).await?;
            let refund = refund.ok_or(PaymentError::NotFound("refund"))?;
            return Ok(Reply {
                status: 201,
                body: reply_body(&refund.to_object()),
                stored: false,
            });
        }
        let left = self.payment().state.refundable();
        let amount = self.amount_in_currency(amount, left.max(1))?;
        let (state, _) = decide(&self.payment().state, Input::Refund { amount })
            .map_err(|r| PaymentError::rejected(r, "amount.value"))?;
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
            reverse_splits: share.reverse_splits,
            refund_application_fee: share.refund_application_fee,
        };
        let attempt = self.new_attempt(PspOp::Refund { amount }, Some(refund.id.clone()));
        let mut next = self.next_version();
        next.state = state;
        let mut commit = self.transition_commit(&self.live.payment.clone(), &next, "api.refund", None);
        commit.refunds.push(refund.clone());
        if let Some(i) = &mut commit.idempotency {
            i.resource_id = Some(refund.id.to_string());
        }
        self.start(next, commit, attempt, "api.refund", 201, Some(refund)).await
    }

    /// Brings the payment up to what the PSP says now (after the customer finished 3-D Secure).
    pub(super) async fn sync(&mut self) -> Result<Reply, Halt> {
        if self.payment().status() != Status::RequiresAction {
            return Err(PaymentError::rejected(Rejection::InvalidState(self.payment().status()), "").into());
        }
        let reference = self.payment().psp_reference.clone().ok_or(PaymentError::rejected(
            Rejection::InvalidState(Status::RequiresAction),
            "",
        ))?;
        let connector = self.connector_of(None).await?;
        let intent = self
            .call_psp(&connector, "retrieve", connector.psp.retrieve(reference))
            .await?;
        let risk = self.payment().risk.as_ref().map(|r| r.outcome);
        let outcome = Outcome::of_intent(intent, PspOp::Authorize).held_if_reviewed(risk);
        self.apply(outcome, None, "psp.three_d_secure_completed", 200, None)
            .await
    }
}
