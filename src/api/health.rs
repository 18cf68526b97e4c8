//! Liveness and readiness.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{json_value, AppState};

/// `GET /healthz`: the process runs.
pub async fn healthz() -> HttpResponse {
    json_value(200, &json!({ "status": "ok" }))
}

/// `GET /readyz`: PostgreSQL and NATS both answer.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let database = state.db.ping().await;
    let nats = state.nats.is_connected();
    let status = if database && nats { 200 } else { 503 };
    json_value(status, &json!({ "database": database, "nats": nats }))
}
