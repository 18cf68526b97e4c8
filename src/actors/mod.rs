//! Actors: one `PaymentActor` per live payment, serializing its transitions; the
//! `PaymentRegistry` that activates, passivates and restarts them; mailbox accounting.
//!
//! actix has no accessor for a mailbox's length, so every send and receipt is counted here,
//! per actor and per actor kind.

pub mod error;
pub mod event_consumer;
pub mod forward;
pub mod landing;
pub mod ledger_shard;
pub mod mailbox;
pub mod outbox_relay;
pub mod payment;
pub mod payment_flow;
pub mod reconciler;
pub mod registry;
pub mod risk;
pub mod store;
pub mod webhook_delivery;

pub use error::PaymentError;
pub use mailbox::{ActorStats, Mailbox};
pub use payment::{IdemKey, Op, PaymentActor, PaymentCall, Reply};
pub use registry::PaymentRegistry;
