//! The HTTP API of API.md, on actix-web. One route group per file; authentication,
//! idempotency and body validation are shared here, and every error renders through
//! [`crate::error::ApiError`].

pub mod admin;
pub mod auth;
pub mod body;
pub mod disputes;
pub mod health;
pub mod idempotency;
pub mod ledger;
pub mod metrics;
pub mod payments;
pub mod refunds;
pub mod sandbox;
pub mod webhooks;

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use dashmap::DashMap;

use crate::actors::PaymentRegistry;
use crate::adapters::nats::Nats;
use crate::adapters::postgres::merchants::Merchant;
use crate::adapters::postgres::Db;
use crate::adapters::psp::sandbox::SandboxPsp;
use crate::config::Config;
use crate::domain::Currency;
use crate::error::ApiError;

/// What every route may use.
pub struct AppState {
    pub config: Config,
    pub db: Db,
    pub nats: Nats,
    pub registry: Arc<PaymentRegistry>,
    /// The PSP event consumers' totals (one consumer per partition).
    pub event_consumers: Arc<crate::actors::ActorStats>,
    /// The sandbox PSP, when it is the configured one (its own endpoints need it).
    pub sandbox: Option<Arc<SandboxPsp>>,
    /// Merchants by API key hash. Keys are not revoked in this version, so a cached entry
    /// stays true; bounded by `MAX_CACHED_KEYS`.
    pub merchants: DashMap<[u8; 32], Arc<Merchant>>,
    /// The currencies this deployment accepts (`[payments] currencies`).
    pub currencies: Vec<Currency>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub const MAX_CACHED_KEYS: usize = 100_000;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .service(
            web::scope("/api/v1")
                .route("/payments", web::post().to(payments::create))
                .route("/payments", web::get().to(payments::list))
                .route("/payments/{id}", web::get().to(payments::get))
                .route("/payments/{id}/confirm", web::post().to(payments::confirm))
                .route("/payments/{id}/capture", web::post().to(payments::capture))
                .route("/payments/{id}/cancel", web::post().to(payments::cancel))
                .route("/payments/{id}/events", web::get().to(payments::events))
                .route("/payments/{id}/refunds", web::post().to(payments::refund))
                .route("/payments/{id}/refunds", web::get().to(refunds::list_for_payment))
                .route("/refunds/{id}", web::get().to(refunds::get))
                .route("/balance", web::get().to(ledger::balance))
                .route("/disputes", web::get().to(disputes::list))
                .route("/disputes/{id}", web::get().to(disputes::get))
                .route("/ledger/journals", web::get().to(ledger::journals)),
        )
        .route("/admin/v1/merchants", web::post().to(admin::create_merchant))
        .route("/admin/v1/actors", web::get().to(admin::actors))
        .route("/admin/v1/dead_letters", web::get().to(admin::dead_letters))
        .route("/internal/webhooks/psp/{provider}", web::post().to(webhooks::receive))
        .route("/admin/v1/actors/{kind}/{id}", web::get().to(admin::actor))
        .route("/admin/", web::get().to(admin::live_view))
        .route("/sandbox/v1/payment_methods", web::post().to(sandbox::payment_methods))
        .route(
            "/sandbox/v1/payments/{reference}/complete_3ds",
            web::post().to(sandbox::complete_3ds),
        )
        .default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("route"))
}

/// A JSON response with exactly these bytes.
pub fn json_response(status: u16, body: Vec<u8>) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK);
    HttpResponse::build(status).content_type("application/json").body(body)
}

pub fn json_value(status: u16, value: &serde_json::Value) -> HttpResponse {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}
