//! Integration tests: the real server, PostgreSQL and NATS. One binary, so it links once.

mod adyen;
mod cluster;
mod crash;
mod events;
mod helpers;
mod idempotency;
mod isolation;
mod ledger;
mod lifecycle;
mod logs;
mod marketplace;
mod marketplace_sim;
mod money_safety;
mod openapi;
mod operations;
mod outages;
mod process;
mod reconciliation;
mod recovery;
mod reports;
mod risk;
mod routing;
mod single_node;
mod stripe;
mod validation;
mod webhooks_out;
