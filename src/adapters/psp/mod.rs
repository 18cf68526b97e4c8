//! PSPs behind one trait. Every call carries an idempotency key (the attempt id), so a call
//! repeated after a crash or a timeout is the same call to the PSP, never a second charge.

pub mod adyen;
pub mod connector;
pub mod events;
pub mod http;
pub mod sandbox;
pub mod sandbox_settlement;
pub mod sandbox_webhooks;
pub mod signature;
pub mod stripe;

use std::future::Future;
use std::pin::Pin;

use crate::domain::risk::CardSignals;
use crate::domain::{AttemptId, CaptureStrategy, Failure, MerchantId, Money, PaymentId};

pub type PspFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PspError>> + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PspError {
    /// No answer in time, or the PSP is down: the outcome is unknown and the attempt stays open.
    #[error("the PSP did not answer: {0}")]
    Unavailable(String),
    /// The call provably never reached the PSP (connection refused, no route, a circuit
    /// breaker open), or the PSP documents its answer as "not processed": nothing happened
    /// there, so another connector may take the payment.
    #[error("the PSP was not reached: {0}")]
    NotSent(String),
    /// The PSP refused the request itself; nothing happened there.
    #[error("the PSP refused the request: {message}")]
    Invalid {
        code: String,
        message: String,
        param: Option<String>,
    },
}

/// Where a PSP intent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentStatus {
    RequiresAction {
        redirect_url: String,
    },
    /// Funds held; a capture may take up to `amount`.
    Authorized {
        amount: i64,
    },
    /// Captured (automatic capture, or after a capture call).
    Succeeded {
        amount_captured: i64,
    },
    /// The PSP took the authorization and decides it later, by event (Adyen's `Pending` and
    /// `Received`, Stripe's `processing`).
    Processing,
    /// The PSP received a capture of `amount` and confirms it later, by event (Adyen).
    CaptureReceived {
        amount: i64,
    },
    Failed(Failure),
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The PSP's reference, `pi_…`.
    pub reference: String,
    pub client_secret: String,
    pub status: IntentStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PspRefundStatus {
    Pending,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PspRefund {
    pub reference: String,
    pub status: PspRefundStatus,
}

#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub key: AttemptId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub payment_method: String,
    pub capture: CaptureStrategy,
    /// A risk rule asked for 3-D Secure: the PSP must challenge the customer.
    pub three_d_secure: bool,
}

/// A card processor. Implementations: the embedded sandbox; Stripe next.
pub trait Psp: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent>;
    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent>;
    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent>;
    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund>;
    /// The intent as the PSP sees it now.
    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent>;
    /// What the PSP's tokenizer knows of a payment method (never the number), for risk rules.
    /// `None` when the PSP does not say: rules that read card attributes then do not fire.
    fn card<'a>(&'a self, _merchant: &'a MerchantId, _token: &'a str) -> PspFuture<'a, Option<CardSignals>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}
