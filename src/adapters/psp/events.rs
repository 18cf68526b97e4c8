//! PSP events in payrail's terms. Each PSP names its objects and fields its own way (Stripe's
//! `payment_intent.succeeded` with `amount_received`, a charge listing `refunds.data`, …);
//! [`translate`] turns an event into a [`PspFact`], so that the payment flow reasons about
//! facts, not field names. The sandbox and Stripe share Stripe's shapes; Adyen's notifications
//! are translated into the same facts by their bridge.

use serde_json::Value;

use super::PspRefundStatus;
use crate::adapters::nats::PspEvent;
use crate::domain::Failure;

/// The most refunds one charge event lists that payrail reads: Stripe pages a charge's
/// refunds by 100; the rest come in their own events.
pub const MAX_LISTED_REFUNDS: usize = 100;

/// One refund as a charge event lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRefund {
    /// The PSP's refund reference (`re_…`).
    pub reference: String,
    /// `None` while the PSP has not decided it yet.
    pub status: Option<PspRefundStatus>,
}

/// What the PSP says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PspFact {
    /// The payment was captured (or authorized and captured at once), for `amount` if stated.
    Succeeded {
        amount: Option<i64>,
    },
    /// The authorization holds funds, ready to capture.
    Authorized,
    /// The authorization failed.
    Failed(Failure),
    Canceled,
    /// A capture the PSP had received could not be made: the authorization holds.
    CaptureFailed,
    /// Refunds of the payment and where each stands.
    Refunds(Vec<ListedRefund>),
    DisputeOpened {
        reference: String,
        amount: Option<i64>,
        reason: Option<String>,
    },
    DisputeClosed {
        reference: String,
        won: bool,
    },
    /// A fact that moves nothing payrail books, but that an operator must see: kept as a payment
    /// exception (a dispute inquiry to answer, money the PSP took that payrail cannot book).
    Notice(&'static str),
    /// An event type that changes nothing for payrail (recorded, acknowledged, ignored).
    Other,
}

/// A fact with the currency the PSP stated its amounts in (lower or upper case), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub fact: PspFact,
    pub currency: Option<String>,
}

/// An event in payrail's terms. A body that is not JSON reads as an event with no fields.
pub fn translate(event: &PspEvent) -> Translated {
    let object: Value = serde_json::from_slice(&event.object).unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let fact = match event.event_type.as_str() {
        "payment_intent.succeeded" => PspFact::Succeeded {
            amount: object["amount_received"].as_i64().or(object["amount"].as_i64()),
        },
        "payment_intent.amount_capturable_updated" => PspFact::Authorized,
        "payment_intent.payment_failed" => {
            let err = &object["last_payment_error"];
            PspFact::Failed(Failure {
                code: err["code"].as_str().unwrap_or("card_declined").to_owned(),
                decline_code: text(&err["decline_code"]),
                message: err["message"].as_str().unwrap_or("The payment failed.").to_owned(),
            })
        }
        "payment_intent.canceled" => PspFact::Canceled,
        "charge.refunded" | "charge.refund.updated" => {
            // A refund object itself, or a charge listing its refunds.
            let listed = if object["object"] == "refund" {
                vec![object.clone()]
            } else {
                object["refunds"]["data"].as_array().cloned().unwrap_or_default()
            };
            PspFact::Refunds(
                listed
                    .iter()
                    .take(MAX_LISTED_REFUNDS)
                    .filter_map(|l| {
                        Some(ListedRefund {
                            reference: text(&l["id"])?,
                            status: match l["status"].as_str() {
                                Some("succeeded") => Some(PspRefundStatus::Succeeded),
                                Some("failed" | "canceled") => Some(PspRefundStatus::Failed),
                                _ => None,
                            },
                        })
                    })
                    .collect(),
            )
        }
        // An inquiry (`warning_*`: Stripe has withdrawn nothing) is to be answered, not booked;
        // if it becomes a chargeback, its `charge.dispute.funds_withdrawn` opens the dispute.
        "charge.dispute.created" | "charge.dispute.updated" if inquiry(&object) => {
            PspFact::Notice("a dispute inquiry: no funds were withdrawn; answer it at the PSP")
        }
        "charge.dispute.created" | "charge.dispute.funds_withdrawn" => PspFact::DisputeOpened {
            reference: text(&object["id"]).unwrap_or_else(|| event.event_id.clone()),
            amount: object["amount"].as_i64(),
            reason: text(&object["reason"]),
        },
        // An inquiry closed without becoming a chargeback: nothing moved, nothing to close.
        "charge.dispute.closed" if inquiry(&object) => PspFact::Other,
        "charge.dispute.closed" => PspFact::DisputeClosed {
            reference: text(&object["id"]).unwrap_or_default(),
            won: object["status"] == "won",
        },
        t if t.starts_with("adyen.") => return adyen(&object),
        _ => PspFact::Other,
    };
    Translated {
        fact,
        currency: text(&object["currency"]),
    }
}

/// A Stripe dispute in its inquiry stage (`warning_needs_response`, `warning_under_review`,
/// `warning_closed`): no funds are withdrawn for it.
fn inquiry(dispute: &Value) -> bool {
    dispute["status"].as_str().is_some_and(|s| s.starts_with("warning_"))
}

/// An Adyen notification item (`NotificationRequestItem`) in payrail's terms. Its `success`
/// decides; a modification's own reference is `pspReference`, the payment's
/// `originalReference` (the bridge routed the event by it).
fn adyen(item: &Value) -> Translated {
    let success = item["success"].as_str() == Some("true");
    let amount = item["amount"]["value"].as_i64();
    let reference = item["pspReference"].as_str().unwrap_or_default().to_owned();
    let reason = item["reason"].as_str().filter(|r| !r.is_empty());
    let refund = |status| {
        PspFact::Refunds(vec![ListedRefund {
            reference: reference.clone(),
            status: Some(status),
        }])
    };
    let fact = match (item["eventCode"].as_str().unwrap_or_default(), success) {
        ("AUTHORISATION", true) => PspFact::Authorized,
        ("AUTHORISATION", false) => PspFact::Failed(Failure {
            code: "card_declined".into(),
            decline_code: reason.map(super::adyen::decline_code),
            message: reason.unwrap_or("Refused").to_owned(),
        }),
        ("CAPTURE", true) => PspFact::Succeeded { amount },
        ("CAPTURE", false) | ("CAPTURE_FAILED", _) => PspFact::CaptureFailed,
        ("CANCELLATION", true) => PspFact::Canceled,
        ("REFUND", true) => refund(PspRefundStatus::Succeeded),
        ("REFUND", false) | ("REFUND_FAILED", _) => refund(PspRefundStatus::Failed),
        ("CHARGEBACK", _) => PspFact::DisputeOpened {
            reference,
            amount,
            reason: reason.map(str::to_owned),
        },
        ("CHARGEBACK_REVERSED", _) => PspFact::DisputeClosed { reference, won: true },
        // The dispute, won once, is lost after all: Adyen deducts its amount again. A won dispute
        // is final here, so the books cannot follow on their own.
        ("SECOND_CHARGEBACK" | "PREARBITRATION_LOST", _) => {
            PspFact::Notice("the PSP deducted a disputed amount again after the dispute was won; book it by hand")
        }
        _ => PspFact::Other,
    };
    Translated {
        fact,
        currency: item["amount"]["currency"].as_str().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, object: Value) -> PspEvent {
        PspEvent {
            provider: "stripe".into(),
            event_id: "evt_1".into(),
            event_type: event_type.into(),
            reference: "pi_1".into(),
            object: serde_json::to_vec(&object).unwrap(),
            raw: Vec::new(),
            merchant: None,
            unrecorded: false,
        }
    }

    #[test]
    fn stripe_shapes_become_facts() {
        let t = translate(&event(
            "payment_intent.succeeded",
            json!({ "amount": 900, "amount_received": 800, "currency": "usd" }),
        ));
        assert_eq!(t.fact, PspFact::Succeeded { amount: Some(800) });
        assert_eq!(t.currency.as_deref(), Some("usd"));
        let t = translate(&event(
            "charge.refunded",
            json!({ "object": "charge", "refunds": { "data": [
                { "id": "re_1", "status": "succeeded" }, { "id": "re_2", "status": "pending" },
                { "id": "re_3", "status": "canceled" }, { "status": "succeeded" } ] } }),
        ));
        assert_eq!(
            t.fact,
            PspFact::Refunds(vec![
                ListedRefund {
                    reference: "re_1".into(),
                    status: Some(PspRefundStatus::Succeeded)
                },
                ListedRefund {
                    reference: "re_2".into(),
                    status: None
                },
                ListedRefund {
                    reference: "re_3".into(),
                    status: Some(PspRefundStatus::Failed)
                },
            ])
        );
        let t = translate(&event(
            "charge.dispute.closed",
            json!({ "id": "du_1", "status": "lost" }),
        ));
        assert_eq!(
            t.fact,
            PspFact::DisputeClosed {
                reference: "du_1".into(),
                won: false
            }
        );
        assert_eq!(translate(&event("customer.created", json!({}))).fact, PspFact::Other);
        let mut garbage = event("payment_intent.succeeded", Value::Null);
        garbage.object = b"not json".to_vec();
        assert_eq!(translate(&garbage).fact, PspFact::Succeeded { amount: None });
    }

    #[test]
    fn a_stripe_inquiry_books_nothing_until_funds_are_withdrawn() {
        let dispute = |status: &str| json!({ "id": "du_1", "amount": 1000, "currency": "usd", "status": status });
        for t in ["charge.dispute.created", "charge.dispute.updated"] {
            for status in ["warning_needs_response", "warning_under_review"] {
                assert!(
                    matches!(translate(&event(t, dispute(status))).fact, PspFact::Notice(_)),
                    "{t} {status}"
                );
            }
        }
        assert_eq!(
            translate(&event("charge.dispute.closed", dispute("warning_closed"))).fact,
            PspFact::Other,
            "an inquiry closed is neither won nor lost"
        );
        let opened = PspFact::DisputeOpened {
            reference: "du_1".into(),
            amount: Some(1000),
            reason: None,
        };
        for t in ["charge.dispute.created", "charge.dispute.funds_withdrawn"] {
            assert_eq!(translate(&event(t, dispute("needs_response"))).fact, opened, "{t}");
        }
        assert_eq!(
            translate(&event("charge.dispute.updated", dispute("under_review"))).fact,
            PspFact::Other
        );
    }

    #[test]
    fn an_adyen_chargeback_after_a_won_dispute_is_for_an_operator() {
        let item = |code: &str| {
            json!({ "eventCode": code, "success": "true", "pspReference": "ADY_D1",
                    "amount": { "value": 1000, "currency": "EUR" } })
        };
        for code in ["SECOND_CHARGEBACK", "PREARBITRATION_LOST"] {
            assert!(matches!(adyen(&item(code)).fact, PspFact::Notice(_)), "{code}");
        }
        assert_eq!(adyen(&item("NOTIFICATION_OF_CHARGEBACK")).fact, PspFact::Other);
        assert!(matches!(adyen(&item("CHARGEBACK")).fact, PspFact::DisputeOpened { .. }));
    }
}
