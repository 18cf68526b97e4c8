//! The HTTP API of docs/API.md, on actix-web. One route group per file; authentication,
//! idempotency and body validation are shared here, and every error renders through
//! [`crate::api::error::ApiError`].

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod body;
pub mod connectors;
pub mod disputes;
pub mod error;
pub mod events;
pub mod health;
pub mod idempotency;
pub mod ledger;
pub mod metrics;
pub mod payments;
pub mod payouts;
pub mod ratelimit;
pub mod reconciliation;
pub mod refunds;
pub mod reports;
pub mod risk;
pub mod sandbox;
pub mod transfers;
pub mod webhook_endpoints;
pub mod webhooks;

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use dashmap::DashMap;

use crate::actors::PaymentRegistry;
use crate::adapters::nats::Nats;
use crate::adapters::postgres::merchants::Merchant;
use crate::adapters::postgres::Db;
use crate::adapters::psp::sandbox::SandboxPsp;
use crate::api::error::ApiError;
use crate::config::Config;
use crate::domain::Currency;

/// What every route may use.
pub struct AppState {
    pub config: Config,
    pub db: Db,
    pub nats: Nats,
    pub registry: Arc<PaymentRegistry>,
    /// The ledger shards (group commit); the payment flow commits through them.
    pub ledger: Arc<crate::actors::ledger_shard::Ledger>,
    /// Reconciliation runs against PSP settlement reports.
    pub reconciler: Arc<crate::actors::reconciler::Reconciler>,
    /// Risk rules' cache and velocity: the risk routes invalidate a merchant's rules on change.
    pub risk: Arc<crate::actors::risk::RiskEngine>,
    /// The PSP event consumers' totals (one consumer per partition).
    pub event_consumers: Arc<crate::actors::ActorStats>,
    /// Merchant webhook delivery: its workers' figures, and the endpoint cache to forget.
    pub webhooks: crate::actors::webhook_delivery::WebhookDelivery,
    /// The sandbox PSP, when it is the configured one (its own endpoints need it).
    pub sandbox: Option<Arc<SandboxPsp>>,
    /// Every merchant's connectors and routing as payments reach them (breakers, outages, the
    /// cache to forget on change).
    pub connectors: Arc<crate::adapters::connectors::Directory>,
    /// Where others reach this server (3-D Secure redirects, the sandbox's webhooks).
    pub public_url: String,
    /// Merchants by API key hash. Keys are not revoked in this version, so a cached entry
    /// stays true; bounded by `MAX_CACHED_KEYS`.
    pub merchants: DashMap<[u8; 32], Arc<Merchant>>,
    /// Look-ups of keys the cache does not hold, at most [`KEY_LOOKUPS`] at once: a flood of
    /// made-up keys (each one a query) holds that many of the pool's connections, never all.
    pub key_lookups: tokio::sync::Semaphore,
    /// `/metrics`' work on PostgreSQL and JetStream, at most [`PROBES`] scrapes at once: a flood
    /// of scrapes holds that many connections, never the pool. A scrape that finds none free
    /// does not queue.
    pub probes: tokio::sync::Semaphore,
    /// `/readyz`'s pings, at most [`PROBES`] at once, apart from the scrapes: a scrape flood
    /// never makes a node look unready.
    pub readiness: tokio::sync::Semaphore,
    /// The currencies this deployment accepts (`[payments] currencies`).
    pub currencies: Vec<Currency>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub rate_limiter: ratelimit::RateLimiter,
    /// Cluster mode: partition ownership (routing, `/admin/v1/cluster`, readiness).
    pub leases: Option<Arc<crate::adapters::cluster::Leases>>,
    /// Idempotency keys creates used lately on this node (`idempotency::RecentKeys`).
    pub recent_keys: idempotency::RecentKeys,
}

pub const MAX_CACHED_KEYS: usize = 100_000;
/// Key look-ups in the database at once (see `AppState::key_lookups`).
pub const KEY_LOOKUPS: usize = 4;
/// Probes at work at once (see `AppState::probes`).
pub const PROBES: usize = 2;

/// Declares every route once: registered by [`routes`], and listed in [`ROUTES`] for the test
/// that keeps `/openapi.json` and the server in step.
macro_rules! api_routes {
    ($($method:ident $path:literal => $handler:path),* $(,)?) => {
        /// Every route the server registers, as (method, path pattern).
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        pub fn routes(cfg: &mut web::ServiceConfig) {
            $(cfg.route($path, web::$method().to($handler));)*
            cfg.default_service(web::to(not_found));
        }
    };
}

api_routes! {
    // The router tries patterns in this order, and each `{param}` pattern costs a regex match:
    // the busiest path with parameters comes first (a PSP event per payment).
    post "/internal/webhooks/psp/{provider}" => webhooks::receive,
    post "/internal/webhooks/psp/{provider}/{connector_id}" => webhooks::receive_for_connector,
    get "/healthz" => health::healthz,
    get "/readyz" => health::readyz,
    get "/metrics" => metrics::metrics,
    get "/openapi.json" => openapi,
    post "/api/v1/payments" => payments::create,
    get "/api/v1/payments" => payments::list,
    get "/api/v1/payments/{id}" => payments::get,
    post "/api/v1/payments/{id}/confirm" => payments::confirm,
    post "/api/v1/payments/{id}/capture" => payments::capture,
    post "/api/v1/payments/{id}/cancel" => payments::cancel,
    post "/api/v1/payments/{id}/approve" => payments::approve,
    post "/api/v1/payments/{id}/reject" => payments::reject,
    get "/api/v1/payments/{id}/events" => payments::events,
    get "/api/v1/payments/{id}/receipt" => reports::receipt,
    post "/api/v1/payments/{id}/refunds" => payments::refund,
    get "/api/v1/payments/{id}/refunds" => refunds::list_for_payment,
    get "/api/v1/refunds/{id}" => refunds::get,
    get "/api/v1/balance" => ledger::balance,
    post "/api/v1/accounts" => accounts::create,
    get "/api/v1/accounts" => accounts::list,
    get "/api/v1/accounts/{id}" => accounts::get,
    post "/api/v1/accounts/{id}" => accounts::update,
    get "/api/v1/accounts/{id}/balance" => accounts::balance,
    post "/api/v1/transfers" => transfers::create,
    get "/api/v1/transfers" => transfers::list,
    get "/api/v1/transfers/{id}" => transfers::get,
    post "/api/v1/transfers/{id}/reversals" => transfers::reverse,
    post "/api/v1/payouts" => payouts::create,
    get "/api/v1/payouts" => payouts::list,
    get "/api/v1/payouts/{id}" => payouts::get,
    post "/api/v1/payouts/{id}/cancel" => payouts::cancel,
    get "/api/v1/connectors" => reconciliation::connectors,
    get "/api/v1/balance_transactions" => reports::balance_transactions,
    get "/api/v1/reports/payments.csv" => reports::payments_csv,
    get "/api/v1/reports/balance_transactions.csv" => reports::balance_transactions_csv,
    get "/api/v1/ledger/journals" => ledger::journals,
    get "/api/v1/disputes" => disputes::list,
    get "/api/v1/disputes/{id}" => disputes::get,
    post "/api/v1/risk/rules" => risk::create_rule,
    get "/api/v1/risk/rules" => risk::list_rules,
    delete "/api/v1/risk/rules/{id}" => risk::delete_rule,
    post "/api/v1/risk/lists/{name}/items" => risk::add_item,
    get "/api/v1/risk/lists/{name}/items" => risk::list_items,
    delete "/api/v1/risk/lists/{name}/items/{item}" => risk::delete_item,
    get "/api/v1/events" => events::list,
    get "/api/v1/events/{id}" => events::get,
    post "/api/v1/events/{id}/redeliver" => events::redeliver,
    post "/api/v1/webhook_endpoints" => webhook_endpoints::create,
    get "/api/v1/webhook_endpoints" => webhook_endpoints::list,
    get "/api/v1/webhook_endpoints/{id}" => webhook_endpoints::get,
    post "/api/v1/webhook_endpoints/{id}" => webhook_endpoints::update,
    delete "/api/v1/webhook_endpoints/{id}" => webhook_endpoints::delete,
    post "/api/v1/webhook_endpoints/{id}/rotate_secret" => webhook_endpoints::rotate_secret,
    get "/api/v1/webhook_endpoints/{id}/deliveries" => webhook_endpoints::deliveries,
    post "/admin/v1/merchants" => admin::create_merchant,
    get "/admin/v1/actors" => admin::actors,
    get "/admin/v1/cluster" => admin::cluster,
    get "/admin/v1/actors/{kind}/{id}" => admin::actor,
    get "/admin/v1/dead_letters" => admin::dead_letters,
    post "/admin/v1/dead_letters/{id}/replay" => admin::replay_dead_letter,
    get "/admin/v1/webhook_endpoints" => admin::webhook_endpoints,
    get "/admin/v1/merchants/{id}/connectors" => reconciliation::merchant_connectors,
    post "/admin/v1/merchants/{id}/connectors" => connectors::create,
    post "/admin/v1/merchants/{id}/connectors/{connector_id}" => connectors::update,
    get "/admin/v1/merchants/{id}/routing" => connectors::get_routing,
    put "/admin/v1/merchants/{id}/routing" => connectors::put_routing,
    get "/admin/v1/connectors" => connectors::health,
    post "/admin/v1/reconciliation/runs" => reconciliation::create_run,
    get "/admin/v1/reconciliation/runs" => reconciliation::list_runs,
    get "/admin/v1/reconciliation/runs/{id}" => reconciliation::get_run,
    get "/admin/v1/reconciliation/exceptions" => reconciliation::list_exceptions,
    post "/admin/v1/reconciliation/exceptions/{id}/resolve" => reconciliation::resolve_exception,
    get "/admin/" => admin::live_view,
    post "/sandbox/v1/connectors/{id}/outage" => connectors::sandbox_outage,
    post "/sandbox/v1/payment_methods" => sandbox::payment_methods,
    post "/sandbox/v1/payments/{reference}/complete_3ds" => sandbox::complete_3ds,
    get "/sandbox/v1/settlement_reports/{date}" => reconciliation::sandbox_report,
    get "/receipts/{token}" => reports::receipt_html,
}

/// `GET /openapi.json`: the OpenAPI 3 document of the whole API.
async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("openapi.json"))
}

/// No route matched: 405 with `Allow` when the path exists under other methods, else 404.
async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    let allowed = methods_for(req.path());
    if allowed.is_empty() {
        return actix_web::ResponseError::error_response(&ApiError::NotFound("route"));
    }
    let allow = allowed.join(", ");
    let body = serde_json::json!({ "error": { "type": "invalid_request_error", "code": "method_not_allowed",
                                              "message": format!("this path allows {allow}") } });
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", allow))
        .content_type("application/json")
        .body(body.to_string())
}

/// The methods `ROUTES` registers for a concrete path (`{param}` segments match any segment).
pub fn methods_for(path: &str) -> Vec<String> {
    let segments: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .filter(|(_, pattern)| {
            let p: Vec<&str> = pattern.split('/').collect();
            p.len() == segments.len()
                && p.iter()
                    .zip(&segments)
                    .all(|(a, b)| a.starts_with('{') && !b.is_empty() || a == b)
        })
        .map(|(m, _)| m.to_uppercase())
        .collect()
}

/// A JSON response with exactly these bytes.
pub fn json_response(status: u16, body: Vec<u8>) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK);
    HttpResponse::build(status).content_type("application/json").body(body)
}

/// The `{id}` of the path when it is an id of our own making with `prefix` (`we_`, `tr_`…):
/// at most 64 ASCII letters, digits and underscores. Anything else names nothing: a 404.
pub fn path_id_with(req: &actix_web::HttpRequest, prefix: &str, what: &'static str) -> Result<String, ApiError> {
    req.match_info()
        .get("id")
        .filter(|id| {
            id.starts_with(prefix) && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .map(str::to_owned)
        .ok_or(ApiError::NotFound(what))
}

pub fn json_value(status: u16, value: &serde_json::Value) -> HttpResponse {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}
