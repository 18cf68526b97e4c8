//! The domain: pure types and rules with no I/O. Money and currencies, prefixed ids, card-data
//! guards, and the payment state machine.

pub mod card;
pub mod ids;
pub mod ledger;
pub mod marketplace;
pub mod money;
pub mod payment;
pub mod record;
pub mod risk;
pub mod routing;
pub mod settlement;
pub mod webhook;

pub use ids::{AccountId, AttemptId, DisputeId, JournalId, MerchantId, PaymentId, RefundId};
pub use money::{platform_fee, Currency, Money, MoneyError, MAX_AMOUNT};
pub use payment::{decide, CaptureStrategy, Effect, Input, JournalKind, PaymentState, PspOp, Rejection, Status};
pub use record::{AttemptRecord, Dispute, DisputeStatus, Failure, NextAction, Payment, Refund, RefundStatus, Routing};
