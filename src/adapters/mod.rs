//! Adapters: everything that talks to the outside. PostgreSQL (all SQL lives here, beside
//! the table it owns), NATS JetStream, the PSPs behind one trait, and outgoing HTTP to
//! merchants' webhook endpoints.

pub mod cluster;
pub mod connectors;
pub mod http_out;
pub mod nats;
pub mod postgres;
pub mod psp;
pub mod secrets;
