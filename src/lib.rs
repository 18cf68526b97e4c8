//! payrail: an actor-based payment orchestrator.
//!
//! # Layout
//!
//! - [`domain`] — pure types and rules, no I/O: [`domain::Money`] and currencies, prefixed ids,
//!   card-data guards, ledger postings, and the payment state machine (one table, one function).
//! - [`adapters`] — the outside world: PostgreSQL (every SQL statement lives beside the table
//!   it owns), NATS JetStream, and the PSPs behind the [`adapters::psp::Psp`] trait, with the
//!   embedded sandbox as the default.
//! - [`actors`] — one `PaymentActor` per live payment, serializing its transitions; the
//!   `PaymentRegistry` that activates, passivates and restarts them; mailbox accounting.
//! - [`api`] — the actix-web routes of docs/API.md, one route group per file: authentication,
//!   idempotency, validation, and the mapping of every layer's errors to HTTP in one place.
//! - [`app`] — wiring: build the application from [`config::Config`], run it until stopped.
//! - [`metrics`] — counters and histograms for `/metrics`, shared by every room.
//! - [`shutdown`] — the stop signal the background loops share, for a graceful exit.
//! - [`loadgen`] — `payrail loadgen`, the load generator, with the PostgreSQL ceiling beside it.
//!
//! Dependencies point inward: `api` → `actors` → `adapters` → `domain` (`api` also reads
//! through `adapters` directly; every change goes through an actor). Each layer answers in its
//! own terms — `adapters::postgres::StoreError`, `actors::PaymentError` — and only
//! `api::error::ApiError` knows HTTP. docs/DESIGN.md, "Dependencies between modules", has the
//! rule and its two deliberate exceptions.

pub mod actors;
pub mod adapters;
pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod loadgen;
pub mod metrics;
pub mod shutdown;
