//! The payment state machine, checked pair by pair against docs/API.md's diagram (written out here
//! independently of the table in src/domain/payment.rs), and by property tests over random
//! input sequences for invariants 5 and 7 of docs/DESIGN.md.

use payrail::domain::payment::{rule_for, InputKind, ALLOWED_EDGES};
use payrail::domain::{decide, Effect, Input, JournalKind, PaymentState, PspOp, Rejection, Status};
use proptest::prelude::*;

/// A state in `status` with room for every amount guard to pass: 10,000 authorized, then
/// 10,000 captured with 1,000 refunded and 1,000 pending where the status implies a capture.
fn state_in(status: Status) -> PaymentState {
    let mut s = PaymentState::new(10_000);
    s.status = status;
    match status {
        Status::Authorized | Status::InReview | Status::Capturing => s.capturable = 10_000,
        Status::Captured | Status::Settled => s.captured = 10_000,
        Status::Refunding => {
            s.captured = 10_000;
            s.refunded = 1_000;
            s.refund_pending = 1_000;
        }
        Status::ChargebackOpen => {
            // 1,000 left undisputed: room for a refund that was pending when it opened.
            s.captured = 10_000;
            s.disputed = 9_000;
        }
        Status::Refunded => {
            s.captured = 10_000;
            s.refunded = 10_000;
        }
        _ => {}
    }
    s.settled = status == Status::Settled;
    s
}

fn sample(kind: InputKind) -> Input {
    match kind {
        InputKind::Confirm => Input::Confirm,
        InputKind::Capture => Input::Capture { amount: 500 },
        InputKind::Cancel => Input::Cancel,
        InputKind::Refund => Input::Refund { amount: 500 },
        InputKind::Approve => Input::Approve,
        InputKind::Reject => Input::Reject,
        InputKind::Authorized => Input::Authorized,
        InputKind::HeldForReview => Input::HeldForReview,
        InputKind::ActionRequired => Input::ActionRequired,
        InputKind::AuthorizationPending => Input::AuthorizationPending,
        InputKind::AuthorizationFailed => Input::AuthorizationFailed,
        InputKind::Charged => Input::Charged { amount: 10_000 },
        InputKind::Captured => Input::Captured { amount: 500 },
        InputKind::CaptureReceived => Input::CaptureReceived { amount: 500 },
        InputKind::CaptureFailed => Input::CaptureFailed,
        InputKind::Canceled => Input::Canceled,
        InputKind::RefundSucceeded => Input::RefundSucceeded { amount: 500 },
        InputKind::RefundFailed => Input::RefundFailed { amount: 500 },
        InputKind::Settled => Input::Settled,
        InputKind::DisputeOpened => Input::DisputeOpened { amount: 500 },
        InputKind::DisputeWon => Input::DisputeWon,
        InputKind::DisputeLost => Input::DisputeLost,
    }
}

/// docs/API.md's diagram as an expectation: `Ok(status after)` or the rejection.
fn expected(status: Status, kind: InputKind) -> Result<Status, Rejection> {
    use InputKind as I;
    use Status::*;
    let invalid = Err(Rejection::InvalidState(status));
    match (kind, status) {
        (I::Confirm, Pending) => Ok(Pending),
        (I::Authorized, Pending | RequiresAction | Processing) => Ok(Authorized),
        (I::HeldForReview, Pending | RequiresAction | Processing) => Ok(InReview),
        // The PSP took the authorization and decides it by event (Adyen's Pending).
        (I::AuthorizationPending, Pending) => Ok(Processing),
        (I::Approve, InReview) => Ok(Authorized),
        (I::Reject, InReview) => Ok(InReview),
        (I::ActionRequired, Pending) => Ok(RequiresAction),
        (I::AuthorizationFailed, Pending | RequiresAction | Processing) => Ok(Failed),
        (I::Charged, Pending | RequiresAction | Processing) => Ok(Captured),
        (I::Capture, Authorized) => Ok(Authorized),
        (I::Captured, Authorized | Capturing) => Ok(Captured),
        // An asynchronous PSP received the capture; it confirms or fails it later.
        (I::CaptureReceived, Authorized) => Ok(Capturing),
        (I::CaptureFailed, Capturing) => Ok(Authorized),
        (I::Cancel, Pending) => Ok(Canceled),
        (I::Cancel, RequiresAction | Processing | Authorized) => Ok(status),
        (I::Canceled, Pending | RequiresAction | Processing | Authorized | InReview | Capturing) => Ok(Canceled),
        (I::Refund, Captured | Settled | Refunding) => Ok(Refunding),
        (I::Refund, Refunded) => Err(Rejection::AmountTooLarge),
        // 1,000 of 1,000 pending settles; 2,000 of 10,000 refunded leaves the payment captured.
        (I::RefundSucceeded | I::RefundFailed, Refunding) => Ok(Captured),
        (I::Settled, Captured) => Ok(Settled),
        // Reconciliation may find the charge while a refund or a dispute is under way.
        (I::Settled, Settled | Refunding | ChargebackOpen) => Ok(status),
        (I::DisputeOpened, Captured | Settled | Refunding) => Ok(ChargebackOpen),
        (I::DisputeWon, ChargebackOpen) => Ok(Settled),
        (I::DisputeLost, ChargebackOpen) => Ok(Refunded),
        _ => invalid,
    }
}

#[test]
fn every_status_and_input_pair_follows_the_diagram() {
    let mut checked = 0;
    for status in Status::ALL {
        for kind in InputKind::ALL {
            let mut state = state_in(status);
            let mut input = sample(kind);
            // The refund outcomes need exactly the pending amount to settle it.
            if matches!(kind, InputKind::RefundSucceeded | InputKind::RefundFailed) {
                input = match kind {
                    InputKind::RefundSucceeded => Input::RefundSucceeded { amount: 1_000 },
                    _ => Input::RefundFailed { amount: 1_000 },
                };
                if status == Status::ChargebackOpen {
                    state.refund_pending = 1_000;
                }
            }
            let got = decide(&state, input).map(|(next, _)| next.status);
            let want = if status == Status::ChargebackOpen
                && matches!(kind, InputKind::RefundSucceeded | InputKind::RefundFailed)
            {
                // A refund settling under an open dispute leaves the dispute open.
                Ok(Status::ChargebackOpen)
            } else {
                expected(status, kind)
            };
            assert_eq!(got, want, "{status:?} + {kind:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 13 * 22);
}

#[test]
fn terminal_statuses_accept_nothing() {
    for status in [Status::Failed, Status::Canceled, Status::Refunded] {
        for kind in InputKind::ALL {
            assert!(
                decide(&state_in(status), sample(kind)).is_err(),
                "{status:?} + {kind:?}"
            );
        }
    }
}

#[test]
fn confirm_asks_the_psp_to_authorize_and_moves_nothing_yet() {
    let (next, effects) = decide(&state_in(Status::Pending), Input::Confirm).unwrap();
    assert_eq!(next, state_in(Status::Pending));
    assert_eq!(effects, vec![Effect::Psp(PspOp::Authorize)]);
}

#[test]
fn partial_capture_releases_the_rest_and_posts_one_capture_journal() {
    let (next, effects) = decide(&state_in(Status::Authorized), Input::Captured { amount: 4_000 }).unwrap();
    assert_eq!(
        (next.status, next.captured, next.capturable),
        (Status::Captured, 4_000, 0)
    );
    assert_eq!(
        effects,
        vec![Effect::Journal {
            kind: JournalKind::Capture,
            amount: 4_000
        }]
    );
}

#[test]
fn capture_above_capturable_is_amount_too_large() {
    let r = decide(&state_in(Status::Authorized), Input::Capture { amount: 10_001 });
    assert_eq!(r, Err(Rejection::AmountTooLarge));
}

#[test]
fn refunds_up_to_the_capture_then_amount_too_large() {
    let mut s = state_in(Status::Captured);
    for _ in 0..4 {
        let (next, effects) = decide(&s, Input::Refund { amount: 2_500 }).unwrap();
        assert_eq!(effects, vec![Effect::Psp(PspOp::Refund { amount: 2_500 })]);
        s = next;
    }
    assert_eq!((s.status, s.refund_pending), (Status::Refunding, 10_000));
    assert_eq!(decide(&s, Input::Refund { amount: 1 }), Err(Rejection::AmountTooLarge));
    for _ in 0..4 {
        s = decide(&s, Input::RefundSucceeded { amount: 2_500 }).unwrap().0;
    }
    assert_eq!((s.status, s.refunded, s.refund_pending), (Status::Refunded, 10_000, 0));
    assert_eq!(decide(&s, Input::Refund { amount: 1 }), Err(Rejection::AmountTooLarge));
}

#[test]
fn a_partial_refund_returns_a_settled_payment_to_settled() {
    let s = state_in(Status::Settled);
    let s = decide(&s, Input::Refund { amount: 100 }).unwrap().0;
    let s = decide(&s, Input::RefundSucceeded { amount: 100 }).unwrap().0;
    assert_eq!(s.status, Status::Settled);
}

#[test]
fn a_failed_refund_gives_its_amount_back() {
    let s = decide(&state_in(Status::Captured), Input::Refund { amount: 10_000 })
        .unwrap()
        .0;
    assert_eq!(s.refundable(), 0);
    let s = decide(&s, Input::RefundFailed { amount: 10_000 }).unwrap().0;
    assert_eq!((s.status, s.refundable()), (Status::Captured, 10_000));
}

#[test]
fn non_positive_amounts_are_rejected() {
    assert_eq!(
        decide(&state_in(Status::Authorized), Input::Capture { amount: 0 }),
        Err(Rejection::AmountNotPositive)
    );
    assert_eq!(
        decide(&state_in(Status::Captured), Input::Refund { amount: -1 }),
        Err(Rejection::AmountNotPositive)
    );
}

#[test]
fn the_table_and_the_edge_list_agree() {
    for status in Status::ALL {
        for kind in InputKind::ALL {
            if let Some(payrail::domain::payment::To::Status(to)) = rule_for(kind, status) {
                if to != status {
                    assert!(
                        ALLOWED_EDGES.contains(&(status, to)),
                        "{status:?} -> {to:?} by {kind:?}"
                    );
                }
            }
        }
    }
}

fn any_input() -> impl Strategy<Value = Input> {
    let amount = 1i64..=12_000;
    prop_oneof![
        Just(Input::Confirm),
        amount.clone().prop_map(|amount| Input::Capture { amount }),
        Just(Input::Cancel),
        amount.clone().prop_map(|amount| Input::Refund { amount }),
        Just(Input::Authorized),
        Just(Input::HeldForReview),
        Just(Input::Approve),
        Just(Input::Reject),
        Just(Input::ActionRequired),
        Just(Input::AuthorizationPending),
        Just(Input::AuthorizationFailed),
        amount.clone().prop_map(|amount| Input::Charged { amount }),
        amount.clone().prop_map(|amount| Input::Captured { amount }),
        amount.clone().prop_map(|amount| Input::CaptureReceived { amount }),
        Just(Input::CaptureFailed),
        Just(Input::Canceled),
        amount.clone().prop_map(|amount| Input::RefundSucceeded { amount }),
        amount.clone().prop_map(|amount| Input::RefundFailed { amount }),
        Just(Input::Settled),
        amount.prop_map(|amount| Input::DisputeOpened { amount }),
        Just(Input::DisputeWon),
        Just(Input::DisputeLost),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Invariants 5 and 7: whatever arrives, in whatever order, refunds never exceed the
    /// capture, the capture never exceeds the authorization, every status change is an edge
    /// of the diagram, and a terminal status stays terminal.
    #[test]
    fn no_input_sequence_breaks_the_invariants(amount in 1i64..=10_000, inputs in prop::collection::vec(any_input(), 1..60)) {
        let mut s = PaymentState::new(amount);
        let mut journaled_capture = 0i64;
        let mut journaled_refund = 0i64;
        for input in inputs {
            if let Ok((next, effects)) = decide(&s, input) {
                prop_assert!(!s.status.is_terminal(), "{:?} left terminal {:?}", input, s.status);
                if next.status != s.status {
                    prop_assert!(ALLOWED_EDGES.contains(&(s.status, next.status)), "{:?} -> {:?}", s.status, next.status);
                }
                prop_assert!(next.amounts_consistent(), "{:?} + {:?} -> {:?}", s, input, next);
                for e in effects {
                    match e {
                        Effect::Journal { kind: JournalKind::Capture, amount } => journaled_capture += amount,
                        Effect::Journal { kind: JournalKind::Refund, amount } => journaled_refund += amount,
                        _ => {}
                    }
                }
                s = next;
            }
            // What the ledger was told matches what the payment says.
            prop_assert_eq!(journaled_capture, s.captured);
            prop_assert_eq!(journaled_refund, s.refunded);
        }
    }
}

/// docs/API.md, "Disputes": a dispute takes at most the capture less refunds, pending or
/// succeeded. Capture 1,000, refund 400: a dispute of 1,000 is refused (the actor clamps it
/// to 600 first), one of 600 opens, and the refund settling later still fits.
#[test]
fn a_dispute_takes_at_most_what_refunds_left() {
    let mut s = PaymentState::new(1_000);
    s.status = Status::Captured;
    s.captured = 1_000;
    s.refunded = 400;
    assert_eq!(s.disputable(), 600);
    assert_eq!(
        decide(&s, Input::DisputeOpened { amount: 1_000 }),
        Err(Rejection::AmountTooLarge)
    );
    let (opened, _) = decide(&s, Input::DisputeOpened { amount: 600 }).unwrap();
    assert_eq!((opened.status, opened.disputed), (Status::ChargebackOpen, 600));

    // A pending refund counts as taken too.
    let mut p = PaymentState::new(1_000);
    p.status = Status::Refunding;
    p.captured = 1_000;
    p.refund_pending = 300;
    assert_eq!(p.disputable(), 700);
    let (opened, _) = decide(&p, Input::DisputeOpened { amount: 700 }).unwrap();
    let (settled, _) = decide(&opened, Input::RefundSucceeded { amount: 300 }).unwrap();
    assert!(settled.amounts_consistent(), "{settled:?}");
    assert_eq!((settled.refunded, settled.disputed), (300, 700));
}

/// A payment held for review is authorized but not capturable; approving makes it an ordinary
/// authorized payment, rejecting asks the PSP to cancel the authorization.
#[test]
fn review_holds_the_authorization_until_the_merchant_decides() {
    let held = decide(&state_in(Status::Pending), Input::HeldForReview).unwrap().0;
    assert_eq!((held.status, held.capturable), (Status::InReview, 10_000));
    assert_eq!(
        decide(&held, Input::Capture { amount: 100 }),
        Err(Rejection::InvalidState(Status::InReview))
    );
    let (approved, effects) = decide(&held, Input::Approve).unwrap();
    assert_eq!((approved.status, effects), (Status::Authorized, vec![]));
    assert!(decide(&approved, Input::Capture { amount: 10_000 }).is_ok());
    let (rejected, effects) = decide(&held, Input::Reject).unwrap();
    assert_eq!(
        (rejected.status, effects),
        (Status::InReview, vec![Effect::Psp(PspOp::Cancel)])
    );
    let canceled = decide(&rejected, Input::Canceled).unwrap().0;
    assert_eq!((canceled.status, canceled.capturable), (Status::Canceled, 0));
}

/// An asynchronous PSP (Adyen) received a capture: no other capture and no cancel until it
/// confirms (the capture journal then) or fails it (the authorization holds as before).
#[test]
fn a_received_capture_holds_the_authorization_until_the_psp_decides() {
    let (capturing, effects) = decide(&state_in(Status::Authorized), Input::CaptureReceived { amount: 6_000 }).unwrap();
    assert_eq!(
        (capturing.status, capturing.capturable, capturing.captured),
        (Status::Capturing, 10_000, 0)
    );
    assert!(effects.is_empty(), "nothing is posted before the PSP confirms");
    for refused in [
        Input::Capture { amount: 100 },
        Input::Cancel,
        Input::Refund { amount: 100 },
    ] {
        assert_eq!(
            decide(&capturing, refused),
            Err(Rejection::InvalidState(Status::Capturing)),
            "{refused:?}"
        );
    }
    let (captured, effects) = decide(&capturing, Input::Captured { amount: 6_000 }).unwrap();
    assert_eq!(
        (captured.status, captured.captured, captured.capturable),
        (Status::Captured, 6_000, 0)
    );
    assert_eq!(
        effects,
        vec![Effect::Journal {
            kind: JournalKind::Capture,
            amount: 6_000
        }]
    );
    let (back, effects) = decide(&capturing, Input::CaptureFailed).unwrap();
    assert_eq!((back.status, back.capturable), (Status::Authorized, 10_000));
    assert!(effects.is_empty());
    assert_eq!(
        decide(&capturing, Input::CaptureReceived { amount: 10_001 }).map(|s| s.0.status),
        Err(Rejection::InvalidState(Status::Capturing))
    );
    assert_eq!(
        decide(&state_in(Status::Authorized), Input::CaptureReceived { amount: 10_001 }),
        Err(Rejection::AmountTooLarge)
    );
}
