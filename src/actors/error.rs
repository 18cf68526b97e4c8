//! What a payment actor answers when an operation does not succeed: outcomes in the payment's
//! own terms. The API maps them to HTTP statuses (`api::error`); nothing here knows HTTP.

use crate::adapters::postgres::StoreError;
use crate::domain::Rejection;

/// `PaymentError::Unavailable` reasons about capacity or the PSP's API, not about the message
/// itself: a PSP event meeting one waits it out without counting toward its dead letter.
pub const PSP_UNAVAILABLE: &str = "psp";
pub const CONNECTOR_UNAVAILABLE: &str = "connector";
/// Not pressure: the actor panicked on the message, or stopped before taking it three times; a
/// PSP event meeting that counts toward its dead letter (a bug must be seen, not retried forever).
pub const ACTOR_GONE: &str = "payment actor";
pub const MAILBOX_FULL: &str = "payment actor (mailbox full)";
pub const TOO_MANY_LIVE: &str = "payment actors (too many live)";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PaymentError {
    /// The state machine refused the operation; `param` names the request field it concerns.
    #[error("{rejection}")]
    Rejected { rejection: Rejection, param: &'static str },
    /// A request field this payment cannot take (an amount in another currency).
    #[error("{message}")]
    InvalidParam { param: &'static str, message: &'static str },
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The PSP refused the request itself: nothing happened there.
    #[error("{message}")]
    PspRefused {
        code: &'static str,
        message: String,
        param: Option<String>,
    },
    /// A newer request with the same idempotency key took the key over while this one ran.
    #[error("the idempotency key was taken over by a newer request")]
    KeyTakenOver,
    /// The create's first commit was to claim its idempotency key, and another request holds
    /// it: nothing was written.
    #[error("the idempotency key is held by another request")]
    KeyHeld,
    /// Not now: a dependency is down, a bound is reached, or what the message needs has not
    /// happened yet (an event before its predecessor). Retrying later is right.
    #[error("{0} is unavailable; retry later")]
    Unavailable(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Cluster mode: the payment's node did not answer a forwarded call in time; it may still
    /// be at work on it.
    #[error("the payment's node did not answer in time; the outcome is unknown")]
    OutcomeUnknown,
    /// Cluster mode: the node that owns the payment answered this, already in the API's words
    /// (status and body as docs/API.md shapes them).
    #[error("the payment's node answered {status}")]
    Remote {
        status: u16,
        body: Vec<u8>,
        /// Whether an idempotent request stores it for replay (the owner's verdict).
        replayable: bool,
    },
}

impl PaymentError {
    pub fn rejected(rejection: Rejection, param: &'static str) -> PaymentError {
        PaymentError::Rejected { rejection, param }
    }
}

impl PaymentError {
    /// Whether trying again later may succeed (an outage, a bound, an event before its time).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PaymentError::Unavailable(_)
                | PaymentError::Store(StoreError::Unavailable)
                | PaymentError::Remote { status: 503, .. }
                | PaymentError::OutcomeUnknown
        )
    }
}

impl PaymentError {
    /// Capacity or the PSP's API (see [`PSP_UNAVAILABLE`] and the others), not the message.
    pub fn is_pressure(&self) -> bool {
        matches!(self, PaymentError::Unavailable(w)
            if [PSP_UNAVAILABLE, CONNECTOR_UNAVAILABLE, MAILBOX_FULL, TOO_MANY_LIVE].contains(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_capacity_and_the_psps_api_are_pressure_a_panic_or_a_hold_is_not() {
        for w in [PSP_UNAVAILABLE, CONNECTOR_UNAVAILABLE, MAILBOX_FULL, TOO_MANY_LIVE] {
            assert!(PaymentError::Unavailable(w).is_pressure(), "{w}");
        }
        for w in [
            ACTOR_GONE,
            "the dispute this event closes (not opened yet)",
            "the refund this event settles (not recorded yet)",
            "ledger",
        ] {
            assert!(!PaymentError::Unavailable(w).is_pressure(), "{w}");
        }
        assert!(!PaymentError::NotFound("payment").is_pressure());
    }
}
