//! The payment state machine: one declarative table and one pure function, [`decide`].
//!
//! `decide(state, input)` answers what happens to a payment when a merchant's command or a
//! PSP's outcome arrives: the next state and the effects to run (a PSP call, a journal), or a
//! rejection. It does no I/O; the payment actor runs the effects and persists the result.

use serde::{Deserialize, Serialize};

/// A payment's status (docs/API.md, "Payments").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    RequiresAction,
    /// The PSP took the authorization and decides it later (Adyen's `Pending`/`Received`,
    /// Stripe's `processing`): its event authorizes, charges or fails it.
    Processing,
    Authorized,
    /// Authorized at the PSP, held by a risk rule until the merchant approves or rejects it:
    /// not capturable.
    InReview,
    /// A capture the PSP received and has not confirmed yet (an asynchronous PSP such as
    /// Adyen): no other capture or cancel until it confirms or fails.
    Capturing,
    Captured,
    Settled,
    Refunding,
    ChargebackOpen,
    Failed,
    Canceled,
    Refunded,
}

impl Status {
    pub const ALL: [Status; 13] = [
        Status::Pending,
        Status::RequiresAction,
        Status::Processing,
        Status::Authorized,
        Status::InReview,
        Status::Capturing,
        Status::Captured,
        Status::Settled,
        Status::Refunding,
        Status::ChargebackOpen,
        Status::Failed,
        Status::Canceled,
        Status::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::RequiresAction => "requires_action",
            Status::Processing => "processing",
            Status::Authorized => "authorized",
            Status::InReview => "in_review",
            Status::Capturing => "capturing",
            Status::Captured => "captured",
            Status::Settled => "settled",
            Status::Refunding => "refunding",
            Status::ChargebackOpen => "chargeback_open",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
            Status::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Failed | Status::Canceled | Status::Refunded)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureStrategy {
    Automatic,
    Manual,
}

impl CaptureStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureStrategy::Automatic => "automatic",
            CaptureStrategy::Manual => "manual",
        }
    }
}

/// What the state machine knows of a payment: its status and its amounts, all in the
/// payment's own currency (the actor checks the currency before anything reaches here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentState {
    pub status: Status,
    /// The amount the payment was created for.
    pub amount: i64,
    /// What an authorization still holds and a capture may take.
    pub capturable: i64,
    pub captured: i64,
    /// Refunds the PSP confirmed.
    pub refunded: i64,
    /// Refunds requested and not yet confirmed or failed.
    pub refund_pending: i64,
    /// Whether the captured funds were settled (reconciliation, or a won dispute): a finished
    /// partial refund returns the payment to `settled` rather than `captured`.
    pub settled: bool,
    /// The amount under an open dispute.
    pub disputed: i64,
}

impl PaymentState {
    pub fn new(amount: i64) -> PaymentState {
        PaymentState {
            status: Status::Pending,
            amount,
            capturable: 0,
            captured: 0,
            refunded: 0,
            refund_pending: 0,
            settled: false,
            disputed: 0,
        }
    }

    /// What a refund may still take: captured minus pending and succeeded refunds.
    pub fn refundable(&self) -> i64 {
        self.captured - self.refunded - self.refund_pending
    }

    /// Invariants 5 and 7's amount half (docs/DESIGN.md): refunds never exceed the capture, the
    /// capture never exceeds the authorization, nothing is negative.
    pub fn amounts_consistent(&self) -> bool {
        self.capturable >= 0
            && self.captured >= 0
            && self.refunded >= 0
            && self.refund_pending >= 0
            && self.disputed >= 0
            && self.capturable <= self.amount
            && self.captured <= self.amount
            && self.refunded + self.refund_pending <= self.captured
            && self.disputed + self.refunded + self.refund_pending <= self.captured
    }

    /// What a dispute may still take: the capture less refunds, pending or succeeded. A PSP
    /// that disputes more is clamped to this (docs/API.md, "Disputes").
    pub fn disputable(&self) -> i64 {
        self.captured - self.refunded - self.refund_pending
    }
}

/// A merchant's command or a PSP's outcome. Amounts are minor units of the payment's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    // Commands, from the API.
    Confirm,
    Capture {
        amount: i64,
    },
    Cancel,
    Refund {
        amount: i64,
    },
    /// The merchant approves a payment a risk rule held for review.
    Approve,
    /// The merchant rejects it: the authorization is canceled at the PSP.
    Reject,
    // Outcomes, from the PSP's answer or its events.
    Authorized,
    /// Authorized at the PSP, and a risk rule asked for a review first.
    HeldForReview,
    ActionRequired,
    /// The PSP took the authorization and will decide it by event.
    AuthorizationPending,
    AuthorizationFailed,
    /// Authorized and captured in one step (automatic capture).
    Charged {
        amount: i64,
    },
    Captured {
        amount: i64,
    },
    /// The PSP received a capture and will confirm it later (by event).
    CaptureReceived {
        amount: i64,
    },
    /// The PSP could not make a capture it had received: the authorization holds again.
    CaptureFailed,
    Canceled,
    RefundSucceeded {
        amount: i64,
    },
    RefundFailed {
        amount: i64,
    },
    /// Reconciliation found the capture in the PSP's settlement report.
    Settled,
    DisputeOpened {
        amount: i64,
    },
    DisputeWon,
    DisputeLost,
}

/// The input's name without its data, the table's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Confirm,
    Capture,
    Cancel,
    Refund,
    Approve,
    Reject,
    Authorized,
    HeldForReview,
    ActionRequired,
    AuthorizationPending,
    AuthorizationFailed,
    Charged,
    Captured,
    CaptureReceived,
    CaptureFailed,
    Canceled,
    RefundSucceeded,
    RefundFailed,
    Settled,
    DisputeOpened,
    DisputeWon,
    DisputeLost,
}

impl InputKind {
    pub const ALL: [InputKind; 22] = [
        InputKind::Confirm,
        InputKind::Capture,
        InputKind::Cancel,
        InputKind::Refund,
        InputKind::Approve,
        InputKind::Reject,
        InputKind::Authorized,
        InputKind::HeldForReview,
        InputKind::ActionRequired,
        InputKind::AuthorizationPending,
        InputKind::AuthorizationFailed,
        InputKind::Charged,
        InputKind::Captured,
        InputKind::CaptureReceived,
        InputKind::CaptureFailed,
        InputKind::Canceled,
        InputKind::RefundSucceeded,
        InputKind::RefundFailed,
        InputKind::Settled,
        InputKind::DisputeOpened,
        InputKind::DisputeWon,
        InputKind::DisputeLost,
    ];
}

impl Input {
    pub fn kind(&self) -> InputKind {
        match self {
            Input::Confirm => InputKind::Confirm,
            Input::Capture { .. } => InputKind::Capture,
            Input::Cancel => InputKind::Cancel,
            Input::Refund { .. } => InputKind::Refund,
            Input::Approve => InputKind::Approve,
            Input::Reject => InputKind::Reject,
            Input::Authorized => InputKind::Authorized,
            Input::HeldForReview => InputKind::HeldForReview,
            Input::ActionRequired => InputKind::ActionRequired,
            Input::AuthorizationPending => InputKind::AuthorizationPending,
            Input::AuthorizationFailed => InputKind::AuthorizationFailed,
            Input::Charged { .. } => InputKind::Charged,
            Input::Captured { .. } => InputKind::Captured,
            Input::CaptureReceived { .. } => InputKind::CaptureReceived,
            Input::CaptureFailed => InputKind::CaptureFailed,
            Input::Canceled => InputKind::Canceled,
            Input::RefundSucceeded { .. } => InputKind::RefundSucceeded,
            Input::RefundFailed { .. } => InputKind::RefundFailed,
            Input::Settled => InputKind::Settled,
            Input::DisputeOpened { .. } => InputKind::DisputeOpened,
            Input::DisputeWon => InputKind::DisputeWon,
            Input::DisputeLost => InputKind::DisputeLost,
        }
    }

    fn amount(&self) -> Option<i64> {
        match *self {
            Input::Capture { amount }
            | Input::Refund { amount }
            | Input::Charged { amount }
            | Input::Captured { amount }
            | Input::CaptureReceived { amount }
            | Input::RefundSucceeded { amount }
            | Input::RefundFailed { amount }
            | Input::DisputeOpened { amount } => Some(amount),
            _ => None,
        }
    }
}

/// Where a rule leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The status does not change now: a PSP call decides what comes next.
    Stay,
    Status(Status),
    /// After a refund or dispute settles: `refunding` while refunds are pending, `refunded`
    /// when everything captured was refunded, else back to `settled` or `captured`
    /// (an open dispute stays open).
    RefundSettled,
    /// Always rejected, with this reason, although the status itself would allow the kind of
    /// operation (a refund of a fully refunded payment is `amount_too_large`, not a state error).
    Reject(Rejection),
}

/// A PSP operation the actor must perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PspOp {
    Authorize,
    Capture { amount: i64 },
    Cancel,
    Refund { amount: i64 },
}

/// The journal kinds of docs/API.md, "Postings".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalKind {
    Capture,
    Refund,
    DisputeOpened,
    DisputeWon,
}

impl JournalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalKind::Capture => "capture",
            JournalKind::Refund => "refund",
            JournalKind::DisputeOpened => "dispute_opened",
            JournalKind::DisputeWon => "dispute_won",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Psp(PspOp),
    Journal { kind: JournalKind, amount: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("this operation is not allowed while the payment is {0:?}")]
    InvalidState(Status),
    #[error("the amount is more than what is left")]
    AmountTooLarge,
    #[error("the amount must be positive")]
    AmountNotPositive,
}

struct Rule {
    input: InputKind,
    from: &'static [Status],
    to: To,
}

use Status as S;

/// The transition table: for each input, the statuses it applies in and where it leads.
/// An (input, status) pair that no row names is `InvalidState`. Amount guards and effects
/// are in [`decide`], keyed on the input alone.
const RULES: &[Rule] = &[
    Rule {
        input: InputKind::Confirm,
        from: &[S::Pending],
        to: To::Stay,
    },
    Rule {
        input: InputKind::Authorized,
        from: &[S::Pending, S::RequiresAction, S::Processing],
        to: To::Status(S::Authorized),
    },
    Rule {
        input: InputKind::HeldForReview,
        from: &[S::Pending, S::RequiresAction, S::Processing],
        to: To::Status(S::InReview),
    },
    Rule {
        input: InputKind::AuthorizationPending,
        from: &[S::Pending],
        to: To::Status(S::Processing),
    },
    Rule {
        input: InputKind::Approve,
        from: &[S::InReview],
        to: To::Status(S::Authorized),
    },
    Rule {
        input: InputKind::Reject,
        from: &[S::InReview],
        to: To::Stay,
    },
    Rule {
        input: InputKind::ActionRequired,
        from: &[S::Pending],
        to: To::Status(S::RequiresAction),
    },
    Rule {
        input: InputKind::AuthorizationFailed,
        from: &[S::Pending, S::RequiresAction, S::Processing],
        to: To::Status(S::Failed),
    },
    Rule {
        input: InputKind::Charged,
        from: &[S::Pending, S::RequiresAction, S::Processing],
        to: To::Status(S::Captured),
    },
    Rule {
        input: InputKind::Capture,
        from: &[S::Authorized],
        to: To::Stay,
    },
    Rule {
        input: InputKind::Captured,
        from: &[S::Authorized, S::Capturing],
        to: To::Status(S::Captured),
    },
    Rule {
        input: InputKind::CaptureReceived,
        from: &[S::Authorized],
        to: To::Status(S::Capturing),
    },
    Rule {
        input: InputKind::CaptureFailed,
        from: &[S::Capturing],
        to: To::Status(S::Authorized),
    },
    Rule {
        input: InputKind::Cancel,
        from: &[S::Pending],
        to: To::Status(S::Canceled),
    },
    Rule {
        input: InputKind::Cancel,
        from: &[S::RequiresAction, S::Processing, S::Authorized],
        to: To::Stay,
    },
    // A capture the PSP received may still end in the authorization's expiry.
    Rule {
        input: InputKind::Canceled,
        from: &[
            S::Pending,
            S::RequiresAction,
            S::Processing,
            S::Authorized,
            S::InReview,
            S::Capturing,
        ],
        to: To::Status(S::Canceled),
    },
    Rule {
        input: InputKind::Refund,
        from: &[S::Captured, S::Settled, S::Refunding],
        to: To::Status(S::Refunding),
    },
    Rule {
        input: InputKind::Refund,
        from: &[S::Refunded],
        to: To::Reject(Rejection::AmountTooLarge),
    },
    Rule {
        input: InputKind::RefundSucceeded,
        from: &[S::Refunding, S::ChargebackOpen],
        to: To::RefundSettled,
    },
    Rule {
        input: InputKind::RefundFailed,
        from: &[S::Refunding, S::ChargebackOpen],
        to: To::RefundSettled,
    },
    Rule {
        input: InputKind::Settled,
        from: &[S::Captured],
        to: To::Status(S::Settled),
    },
    // The charge settled while a refund or dispute is under way: the flag is set and the
    // status stays (a finished partial refund then returns to `settled`). A refunded payment
    // is terminal: its settlement changes nothing.
    Rule {
        input: InputKind::Settled,
        from: &[S::Settled, S::Refunding, S::ChargebackOpen],
        to: To::Stay,
    },
    Rule {
        input: InputKind::DisputeOpened,
        from: &[S::Captured, S::Settled, S::Refunding],
        to: To::Status(S::ChargebackOpen),
    },
    Rule {
        input: InputKind::DisputeWon,
        from: &[S::ChargebackOpen],
        to: To::RefundSettled,
    },
    Rule {
        input: InputKind::DisputeLost,
        from: &[S::ChargebackOpen],
        to: To::Status(S::Refunded),
    },
];

/// The rule for an (input, status) pair, if the table has one.
pub fn rule_for(input: InputKind, status: Status) -> Option<To> {
    RULES
        .iter()
        .find(|r| r.input == input && r.from.contains(&status))
        .map(|r| r.to)
}

/// What follows from `input` in `state`: the next state and its effects, or a rejection.
pub fn decide(state: &PaymentState, input: Input) -> Result<(PaymentState, Vec<Effect>), Rejection> {
    let to = rule_for(input.kind(), state.status).ok_or(Rejection::InvalidState(state.status))?;
    if let To::Reject(r) = to {
        return Err(r);
    }
    if let Some(a) = input.amount() {
        if a <= 0 {
            return Err(Rejection::AmountNotPositive);
        }
    }

    let mut next = *state;
    let mut effects = Vec::new();
    match input {
        Input::Confirm => effects.push(Effect::Psp(PspOp::Authorize)),
        Input::Capture { amount } => {
            guard(amount <= state.capturable)?;
            effects.push(Effect::Psp(PspOp::Capture { amount }));
        }
        Input::Cancel => {
            if to == To::Stay {
                effects.push(Effect::Psp(PspOp::Cancel));
            }
        }
        Input::Refund { amount } => {
            guard(amount <= state.refundable())?;
            next.refund_pending += amount;
            effects.push(Effect::Psp(PspOp::Refund { amount }));
        }
        Input::Authorized | Input::HeldForReview => next.capturable = state.amount,
        Input::Approve => {}
        Input::Reject => effects.push(Effect::Psp(PspOp::Cancel)),
        Input::ActionRequired | Input::AuthorizationPending | Input::AuthorizationFailed | Input::DisputeLost => {}
        Input::Charged { amount } => {
            guard(amount <= state.amount)?;
            next.capturable = 0;
            next.captured = amount;
            effects.push(Effect::Journal {
                kind: JournalKind::Capture,
                amount,
            });
        }
        // The capture stays reserved in `capturable` while the PSP works on it: a failure
        // leaves the authorization as it was.
        Input::CaptureReceived { amount } => guard(amount <= state.capturable)?,
        Input::CaptureFailed => {}
        Input::Captured { amount } => {
            guard(amount <= state.capturable)?;
            // A partial capture releases the rest of the authorization.
            next.capturable = 0;
            next.captured = amount;
            effects.push(Effect::Journal {
                kind: JournalKind::Capture,
                amount,
            });
        }
        Input::Canceled => next.capturable = 0,
        Input::RefundSucceeded { amount } => {
            guard(amount <= state.refund_pending)?;
            next.refund_pending -= amount;
            next.refunded += amount;
            effects.push(Effect::Journal {
                kind: JournalKind::Refund,
                amount,
            });
        }
        Input::RefundFailed { amount } => {
            guard(amount <= state.refund_pending)?;
            next.refund_pending -= amount;
        }
        Input::Settled => next.settled = true,
        Input::DisputeOpened { amount } => {
            guard(amount <= state.disputable())?;
            next.disputed = amount;
            effects.push(Effect::Journal {
                kind: JournalKind::DisputeOpened,
                amount,
            });
        }
        Input::DisputeWon => {
            effects.push(Effect::Journal {
                kind: JournalKind::DisputeWon,
                amount: state.disputed,
            });
            next.disputed = 0;
            next.settled = true;
        }
    }

    next.status = match to {
        To::Stay => state.status,
        To::Status(s) => s,
        To::RefundSettled => after_refund(&next),
        To::Reject(r) => return Err(r),
    };
    debug_assert!(next.amounts_consistent(), "{state:?} + {input:?} -> {next:?}");
    Ok((next, effects))
}

fn guard(ok: bool) -> Result<(), Rejection> {
    if ok {
        Ok(())
    } else {
        Err(Rejection::AmountTooLarge)
    }
}

fn after_refund(next: &PaymentState) -> Status {
    if next.disputed > 0 {
        Status::ChargebackOpen
    } else if next.refund_pending > 0 {
        Status::Refunding
    } else if next.refunded == next.captured {
        Status::Refunded
    } else if next.settled {
        Status::Settled
    } else {
        Status::Captured
    }
}

/// The edges of docs/API.md's diagram, plus the two a dispute needs when it meets a pending refund
/// (refunding → chargeback_open, chargeback_open → refunding). Every status change `decide`
/// makes is one of these; the property tests check it.
pub const ALLOWED_EDGES: &[(Status, Status)] = &[
    (S::Pending, S::Authorized),
    (S::Pending, S::RequiresAction),
    (S::Pending, S::Captured),
    (S::Pending, S::Failed),
    (S::Pending, S::Canceled),
    (S::Pending, S::Processing),
    (S::Processing, S::Authorized),
    (S::Processing, S::InReview),
    (S::Processing, S::Captured),
    (S::Processing, S::Failed),
    (S::Processing, S::Canceled),
    (S::RequiresAction, S::Authorized),
    (S::RequiresAction, S::Captured),
    (S::RequiresAction, S::Failed),
    (S::RequiresAction, S::Canceled),
    (S::Authorized, S::Captured),
    (S::Authorized, S::Canceled),
    (S::Authorized, S::Capturing),
    (S::Capturing, S::Captured),
    (S::Capturing, S::Authorized),
    (S::Capturing, S::Canceled),
    (S::Pending, S::InReview),
    (S::RequiresAction, S::InReview),
    (S::InReview, S::Authorized),
    (S::InReview, S::Canceled),
    (S::Captured, S::Settled),
    (S::Captured, S::Refunding),
    (S::Settled, S::Refunding),
    (S::Refunding, S::Captured),
    (S::Refunding, S::Settled),
    (S::Refunding, S::Refunded),
    (S::Captured, S::ChargebackOpen),
    (S::Settled, S::ChargebackOpen),
    (S::Refunding, S::ChargebackOpen),
    (S::ChargebackOpen, S::Settled),
    (S::ChargebackOpen, S::Refunded),
    (S::ChargebackOpen, S::Refunding),
];
