//! Liveness and readiness.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{json_value, AppState};

/// `GET /healthz`: the process runs.
pub async fn healthz() -> HttpResponse {
    json_value(200, &json!({ "status": "ok" }))
}

/// `GET /readyz`: PostgreSQL and NATS both answer. The ping takes one of readiness' permits
/// (`AppState::readiness`), waiting at most half a second: a flood of probes is answered 503 (not
/// known to be ready), never with the pool's connections.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let database = match tokio::time::timeout(std::time::Duration::from_millis(500), state.readiness.acquire()).await {
        Ok(Ok(_permit)) => state.db.ping().await,
        _ => false,
    };
    let nats = state.nats.is_connected();
    let Some(leases) = &state.leases else {
        let status = if database && nats { 200 } else { 503 };
        return json_value(status, &json!({ "database": database, "nats": nats }));
    };
    // Cluster mode: ready once every partition has a live owner and this node serves some (or
    // the cluster has more nodes than partitions).
    let (owned, complete) = (leases.owned(), leases.complete());
    let serving = owned > 0 || leases.nodes().len() > leases.partitions() as usize;
    let status = if database && nats && complete && serving {
        200
    } else {
        503
    };
    json_value(
        status,
        &json!({ "database": database, "nats": nats,
            "cluster": { "node": &*leases.node, "partitions_owned": owned, "complete": complete } }),
    )
}
