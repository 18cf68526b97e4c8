//! Integration tests: the real server, PostgreSQL and NATS. One binary, so it links once.

mod helpers;
mod idempotency;
mod isolation;
mod lifecycle;
mod logs;
mod recovery;
mod validation;
