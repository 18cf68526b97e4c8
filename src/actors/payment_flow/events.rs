//! PSP events, applied at most once (docs/API.md, "PSP events"), as the facts
//! `adapters::psp::events` makes of them: the flow never reads a PSP's field names.

use super::attempts::Outcome;
use super::{Flow, Halt, DUPLICATE_EVENT};
use crate::actors::error::PaymentError;
use crate::actors::payment::Reply;
use crate::adapters::nats::PspEvent;
use crate::adapters::postgres::commit::ProcessedEvent;
use crate::adapters::psp::events::{translate, ListedRefund, PspFact};
use crate::adapters::psp::PspRefund;
use crate::domain::risk::RiskAction;
use crate::domain::{Dispute, DisputeId, DisputeStatus, Input, Money, PspOp, RefundStatus, Status};

impl Flow<'_> {
    /// Applies a PSP event at most once. An event that no longer moves the payment (it is
    /// already past it) is recorded and changes nothing: never backwards. An event that comes
    /// before what it refers to (a dispute closed before it was opened, a refund settled
    /// before payrail knows its reference) is not recorded: it fails, and the consumer
    /// delivers it again later, or parks it as a dead letter.
    pub(super) async fn psp_event(&mut self, e: &PspEvent) -> Result<Reply, Halt> {
        // The consumer's look-up of the payment said whether it was recorded, just before.
        if !e.unrecorded && self.deps.store.event_processed(&e.provider, &e.event_id).await? {
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
        let translated = translate(e);
        let status = self.payment().status();
        let cause = format!("psp.{}", e.event_type);
        let currency = self.payment().currency;
        let mut outcome = Outcome::recorded();
        if let Some(c) = translated.currency.as_deref() {
            if !c.eq_ignore_ascii_case(currency.code()) {
                // Never apply an amount in another currency: record it for an operator.
                self.event = Some(event);
                outcome.exception = Some(format!(
                    "{cause} {}: amount in {c}, the payment is in {}",
                    e.event_id,
                    currency.code()
                ));
                return self.settle_event(outcome, &cause).await;
            }
        }
        if !e.reference.is_empty() && self.payment().psp_reference.as_deref() != Some(e.reference.as_str()) {
            // About an intent this payment left behind (an authorization failed over to another
            // connector after a soft decline): a fact, recorded, that moves nothing.
            self.event = Some(event);
            return self.settle_event(outcome, &cause).await;
        }
        match translated.fact {
            PspFact::Succeeded { amount: None } if status == Status::Capturing => {
                // A capture under way may be of part of the authorization: only the PSP's amount
                // says what it took. Without one nothing is guessed; an operator sees it, and the
                // PSP's own report of the capture (or reconciliation) decides.
                outcome.exception = Some(format!(
                    "{cause} {}: a success without an amount while a capture is under way; nothing applied",
                    e.event_id
                ));
            }
            PspFact::Succeeded { amount } => {
                let amount = amount.unwrap_or(self.payment().state.amount);
                outcome.input = match status {
                    Status::Pending | Status::RequiresAction | Status::Processing => Some(Input::Charged { amount }),
                    Status::Authorized | Status::Capturing => Some(Input::Captured { amount }),
                    _ => None,
                };
            }
            PspFact::Authorized => {
                if matches!(status, Status::Pending | Status::RequiresAction | Status::Processing) {
                    // A payment a rule held for review stays held, whichever news comes first.
                    let review = self.payment().risk.as_ref().map(|r| r.outcome) == Some(RiskAction::Review);
                    outcome.input = Some(if review {
                        Input::HeldForReview
                    } else if self.payment().capture_strategy == crate::domain::CaptureStrategy::Automatic {
                        // Authorized with automatic capture (Adyen's AUTHORISATION): captured.
                        Input::Charged {
                            amount: self.payment().state.amount,
                        }
                    } else {
                        Input::Authorized
                    });
                }
            }
            PspFact::Failed(failure) => {
                if matches!(status, Status::Pending | Status::RequiresAction | Status::Processing) {
                    outcome.input = Some(Input::AuthorizationFailed);
                    outcome.failure = Some(failure);
                }
            }
            PspFact::Canceled => {
                if matches!(
                    status,
                    Status::Pending
                        | Status::RequiresAction
                        | Status::Processing
                        | Status::Authorized
                        | Status::Capturing
                ) {
                    outcome.input = Some(Input::Canceled);
                }
            }
            PspFact::CaptureFailed => {
                if status == Status::Capturing {
                    outcome.input = Some(Input::CaptureFailed);
                } else if self.payment().state.captured > 0 {
                    // Booked as captured (Adyen's AUTHORISATION with automatic capture is
                    // booked at once), and the PSP says the capture failed: the books and the
                    // PSP disagree about money, which an operator must see.
                    outcome.exception = Some(format!(
                        "{cause} {}: the PSP reports a failed capture of a payment booked as captured ({}); nothing applied",
                        e.event_id,
                        self.payment().state.captured
                    ));
                }
            }
            PspFact::Refunds(listed) => {
                self.event = Some(event);
                return self.settle_refunds(&listed, &cause).await;
            }
            PspFact::DisputeOpened {
                reference,
                amount,
                reason,
            } => {
                self.open_dispute(&mut outcome, &cause, reference, amount, reason)
                    .await?
            }
            PspFact::DisputeClosed { reference, won } => {
                let payment_id = self.payment().id.clone();
                let Some(mut d) = self.deps.store.dispute(&payment_id, &reference).await? else {
                    // Its `charge.dispute.created` has not come yet: hold this one until it has.
                    return Err(PaymentError::Unavailable("the dispute this event closes (not opened yet)").into());
                };
                if matches!(d.status, DisputeStatus::NeedsResponse | DisputeStatus::UnderReview) {
                    d.status = if won { DisputeStatus::Won } else { DisputeStatus::Lost };
                    d.updated_at = self.deps.clock.now();
                    outcome.input = Some(if won { Input::DisputeWon } else { Input::DisputeLost });
                    self.dispute = Some(d);
                }
            }
            PspFact::Notice(what) => {
                outcome.exception = Some(format!("{cause} {}: {what}", e.event_id));
            }
            PspFact::Other => {}
        }
        self.event = Some(event);
        self.settle_event(outcome, &cause).await
    }

    /// docs/API.md, "Disputes": a dispute takes at most what is left of the capture once
    /// refunds (pending or succeeded) are set aside; a PSP that disputes more is kept as an
    /// exception. Opened once per (payment, PSP reference).
    async fn open_dispute(
        &mut self,
        outcome: &mut Outcome,
        cause: &str,
        reference: String,
        amount: Option<i64>,
        reason: Option<String>,
    ) -> Result<(), Halt> {
        let payment_id = self.payment().id.clone();
        if self.deps.store.dispute(&payment_id, &reference).await?.is_some() {
            // Opened already (under another event id): nothing more.
            return Ok(());
        }
        let s = self.payment().state;
        let asked = amount.unwrap_or(s.captured);
        let left = s.disputable();
        let amount = asked.min(left);
        if amount <= 0 {
            // Nothing captured, all of it refunded or disputed, or an amount that is not one.
            outcome.exception = Some(format!(
                "{cause} {reference}: the PSP disputes {asked}, but the payment ({:?}) has {left} left to dispute; no dispute opened",
                self.payment().status()
            ));
            return Ok(());
        }
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
                amount: Money::new(amount, self.payment().currency),
                status: DisputeStatus::NeedsResponse,
                reason,
                created_at: at,
                updated_at: at,
            });
            outcome.input = Some(Input::DisputeOpened { amount });
        }
        Ok(())
    }

    /// Commits what an event changes, with its dedupe row.
    async fn settle_event(&mut self, outcome: Outcome, cause: &str) -> Result<Reply, Halt> {
        let reply = self.apply(outcome, None, cause, 200, None).await?;
        Ok(Reply { stored: false, ..reply })
    }

    /// Every listed refund that is pending here and final at the PSP settles, each in its own
    /// commit; the event's dedupe row rides on the last. A refund payrail does not know yet
    /// (its reference is not stored: the API's own commit is in flight) holds the event back;
    /// one payrail never made is an exception.
    async fn settle_refunds(&mut self, listed: &[ListedRefund], cause: &str) -> Result<Reply, Halt> {
        let references: Vec<String> = listed.iter().map(|l| l.reference.clone()).collect();
        let known = self
            .deps
            .store
            .refunds_by_reference(&self.payment().id, &references)
            .await?;
        let mut settle = Vec::new();
        let mut unknown = Vec::new();
        // A refund listed twice settles once; listed as both succeeded and failed, not at all
        // (the PSP contradicts itself: an operator decides).
        let mut contradicted = Vec::new();
        for (i, l) in listed.iter().enumerate() {
            let Some(status) = l.status else { continue };
            let earlier = listed[..i]
                .iter()
                .filter(|o| o.reference == l.reference)
                .filter_map(|o| o.status);
            if earlier.clone().next().is_some() {
                if earlier.into_iter().any(|s| s != status) && !contradicted.contains(&l.reference) {
                    contradicted.push(l.reference.clone());
                }
                continue;
            }
            match known
                .iter()
                .find(|r| r.psp_reference.as_deref() == Some(l.reference.as_str()))
            {
                Some(r) if r.status == RefundStatus::Pending => settle.push((r.clone(), status)),
                Some(_) => {}
                None => unknown.push(l.reference.clone()),
            }
        }
        if !unknown.is_empty() && self.live.open.iter().any(|a| matches!(a.op, PspOp::Refund { .. })) {
            return Err(PaymentError::Unavailable("the refund this event settles (not recorded yet)").into());
        }
        settle.retain(|(r, _)| {
            !contradicted
                .iter()
                .any(|c| r.psp_reference.as_deref() == Some(c.as_str()))
        });
        let mut last = Outcome::recorded();
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            problems.push(format!("refunds payrail did not make: {}", unknown.join(", ")));
        }
        if !contradicted.is_empty() {
            problems.push(format!(
                "refunds listed as both succeeded and failed, not settled: {}",
                contradicted.join(", ")
            ));
        }
        if !problems.is_empty() {
            last.exception = Some(format!("{cause}: {}", problems.join("; ")));
        }
        let event = self.event.take();
        for (r, status) in settle {
            let reference = r.psp_reference.clone().unwrap_or_default();
            let o = Outcome::of_refund(PspRefund { reference, status }, r.amount.minor);
            self.apply(o, None, cause, 200, Some(r)).await?;
        }
        self.event = event;
        self.settle_event(last, cause).await
    }
}
