//! Adapters: everything that talks to the outside. PostgreSQL (all SQL lives here, beside
//! the table it owns), NATS JetStream, and the PSPs behind one trait.

pub mod nats;
pub mod postgres;
pub mod psp;
