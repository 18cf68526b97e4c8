//! Operator endpoints under `/admin/v1`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::{self, Fields};
use super::{auth, json_value, AppState};
use crate::adapters::postgres::merchants::NewMerchant;
use crate::api::error::ApiError;
use crate::domain::Currency;

/// `POST /admin/v1/merchants`: the answer carries the API key, the only time it is shown.
/// No idempotency record is kept here: replaying it would mean storing the plaintext key.
pub async fn create_merchant(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let obj = body::object(&body)?;
    let f = Fields::new(
        &obj,
        &["name", "default_currency", "fee_bps", "fee_fixed", "webhook_url"],
        "",
    )?;
    let name = f.req_str("name", 200)?.to_owned();
    let default_currency = f
        .req_str("default_currency", 3)
        .ok()
        .and_then(Currency::parse)
        .filter(|c| state.currencies.contains(c))
        .ok_or_else(|| {
            ApiError::invalid(
                "currency_invalid",
                "default_currency must be an accepted ISO 4217 code",
                "default_currency".to_owned(),
            )
        })?;
    let fee_bps = f
        .opt_int("fee_bps", 0, 10_000)?
        .map(|v| v as u32)
        .unwrap_or(state.config.payments.default_fee_bps);
    let fee_fixed = f
        .opt_int("fee_fixed", 0, 1_000_000_000)?
        .unwrap_or(state.config.payments.default_fee_fixed);
    let webhook_url = f.opt_str("webhook_url", 2048)?.map(str::to_owned);
    if let Some(u) = &webhook_url {
        crate::adapters::http_out::check_target(u, state.config.webhooks_out.allow_private_targets)
            .await
            .map_err(|e| match crate::api::webhook_endpoints::url_error(e) {
                ApiError::InvalidRequest { code, message, .. } => {
                    ApiError::invalid(code, format!("webhook_url: {message}"), "webhook_url".to_owned())
                }
                other => other,
            })?;
    }
    let new = NewMerchant {
        name,
        default_currency,
        fee_bps,
        fee_fixed,
        webhook_url,
    };
    let (merchant, key) = state.db.create_merchant(&new, None).await?;
    let mut object = merchant.to_object();
    object["api_key"] = key.into();
    // A webhook_url becomes the merchant's first webhook endpoint, for every event; its secret
    // is shown here, once.
    // The merchant and its key are committed: whatever happens to the endpoint, the key is
    // answered (it is shown this once, and a second creation would make a second merchant).
    if let Some(url) = &new.webhook_url {
        object["webhook_endpoint"] = match crate::api::webhook_endpoints::first_endpoint(
            &state,
            merchant.id.as_str(),
            url,
        )
        .await
        {
            Ok(endpoint) => endpoint,
            Err(e) => {
                tracing::error!(merchant = %merchant.id, error = %e, "the merchant's first webhook endpoint could not be stored; it makes one through the API");
                serde_json::Value::Null
            }
        };
    }
    Ok(json_value(201, &object))
}

/// Milliseconds since the epoch as RFC 3339, or null before the first message.
fn at(ms: i64) -> serde_json::Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .filter(|_| ms > 0)
        .map(|t| serde_json::json!(crate::domain::record::timestamp(t)))
        .unwrap_or(serde_json::Value::Null)
}

fn payment_status(index: u8) -> &'static str {
    crate::domain::Status::ALL
        .get(index as usize)
        .map(|s| s.as_str())
        .unwrap_or("loading")
}

/// `GET /admin/v1/actors?kind=payment&top=20`: the live actors with the deepest mailboxes,
/// and totals per kind (docs/API.md, "Operator endpoints").
pub async fn actors(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let q = super::payments::query(&req)?;
    let top = super::payments::int_param(&q, "top", 20, 1, 1000)? as usize;
    let kind = q.get("kind").map(String::as_str);
    if !matches!(kind, None | Some("payment") | Some("ledger_shard")) {
        return Err(ApiError::param("kind", "kind must be payment or ledger_shard"));
    }
    let mut list = Vec::new();
    if kind.is_none() || kind == Some("payment") {
        for (id, m) in state.registry.deepest(top) {
            list.push(
                serde_json::json!({ "kind": "payment", "id": id, "mailbox_depth": m.depth(),
                "status": payment_status(m.status()), "last_message_at": at(m.last_message_ms()) }),
            );
        }
    }
    let ledger = &state.ledger;
    if kind.is_none() || kind == Some("ledger_shard") {
        for (i, m) in ledger.mailboxes().iter().enumerate() {
            list.push(serde_json::json!({ "kind": "ledger_shard", "id": format!("ledger_shard-{i}"), "mailbox_depth": m.depth(),
                "status": "running", "last_message_at": at(m.last_message_ms()) }));
        }
    }
    list.sort_by(|a, b| b["mailbox_depth"].as_i64().cmp(&a["mailbox_depth"].as_i64()));
    list.truncate(top);
    let totals = serde_json::json!({
        "payment": { "live": state.registry.stats.live(), "mailbox_depth": state.registry.stats.depth() },
        "ledger_shard": { "live": ledger.kind.live(), "mailbox_depth": ledger.kind.depth() },
        "event_consumer": { "live": state.event_consumers.live(), "mailbox_depth": state.event_consumers.depth() },
        "webhook_endpoint": { "live": state.webhooks.stats.live(), "mailbox_depth": state.webhooks.stats.depth() },
    });
    Ok(json_value(
        200,
        &serde_json::json!({ "actors": list, "totals": totals }),
    ))
}

/// `GET /admin/v1/cluster`: this node, the live nodes with how many partitions each owns, and
/// every partition's owner. Outside cluster mode: one node, no partitions.
pub async fn cluster(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let Some(leases) = &state.leases else {
        return Ok(json_value(
            200,
            &serde_json::json!({ "object": "cluster", "mode": "single", "node": null, "nodes": [],
                "partitions": [], "partition_count": 0 }),
        ));
    };
    let map = leases.map();
    let nodes: Vec<serde_json::Value> = leases
        .nodes()
        .into_iter()
        .map(|n| {
            let owned = map
                .iter()
                .filter(|p| p.owner.as_deref() == Some(n.node.as_str()))
                .count();
            serde_json::json!({ "node": n.node, "url": n.url, "started_at": n.started_at,
                "partitions_owned": owned, "self": n.node == *leases.node })
        })
        .collect();
    Ok(json_value(
        200,
        &serde_json::json!({ "object": "cluster", "mode": "cluster", "node": &*leases.node,
            "partition_count": leases.partitions(), "complete": leases.complete(),
            "nodes": nodes, "partitions": map }),
    ))
}

/// `GET /admin/v1/actors/{kind}/{id}`: one actor: its state, mailbox and recent messages
/// (their type and time; never their content).
pub async fn actor(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let kind = req.match_info().get("kind").unwrap_or_default();
    let id = req.match_info().get("id").unwrap_or_default();
    let recent = |m: &crate::actors::Mailbox| {
        m.recent()
            .into_iter()
            .map(|(t, ms)| serde_json::json!({ "type": t, "at": at(ms) }))
            .collect::<Vec<_>>()
    };
    let body = match kind {
        "payment" => {
            let pid = crate::domain::PaymentId::parse(id).ok_or(ApiError::NotFound("actor"))?;
            let mailbox = state.registry.live_mailbox(&pid);
            let (payment, open) = state.db.load_payment(&pid).await?.ok_or(ApiError::NotFound("actor"))?;
            serde_json::json!({
                "kind": "payment", "id": pid, "live": mailbox.is_some(),
                "mailbox_depth": mailbox.as_ref().map(|m| m.depth()).unwrap_or(0),
                "last_message_at": mailbox.as_ref().map(|m| at(m.last_message_ms())).unwrap_or_default(),
                "recent_messages": mailbox.as_deref().map(recent).unwrap_or_default(),
                "open_psp_attempts": open.len(),
                "state": payment.to_object(),
            })
        }
        "ledger_shard" => {
            let i: usize = id
                .strip_prefix("ledger_shard-")
                .unwrap_or(id)
                .parse()
                .map_err(|_| ApiError::NotFound("actor"))?;
            let ledger = &state.ledger;
            let m = ledger.mailboxes().get(i).cloned().ok_or(ApiError::NotFound("actor"))?;
            serde_json::json!({
                "kind": "ledger_shard", "id": format!("ledger_shard-{i}"), "live": true,
                "mailbox_depth": m.depth(), "last_message_at": at(m.last_message_ms()), "recent_messages": recent(&m),
                "state": { "slot": i, "shards": ledger.shards() },
            })
        }
        _ => return Err(ApiError::NotFound("actor")),
    };
    Ok(json_value(200, &body))
}

/// `GET /admin/`: a small page for people, polling the actors endpoint. No build step, no CDN.
pub async fn live_view() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("admin.html"))
}

/// `GET /admin/v1/dead_letters?limit=50`: PSP events no payment could be found for after every
/// delivery, newest first, with the total.
pub async fn dead_letters(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let q = super::payments::query(&req)?;
    let limit = super::payments::int_param(&q, "limit", 50, 1, 1000)?;
    let (list, total) = state.db.dead_letters(limit).await?;
    let has_more = total > list.len() as i64;
    Ok(json_value(
        200,
        &serde_json::json!({ "object": "list", "data": list, "total": total, "has_more": has_more }),
    ))
}

/// `GET /admin/v1/webhook_endpoints?status=disabled&limit=50`: merchants' webhook endpoints
/// across the deployment, the most recently changed first, with their merchant: where an
/// operator sees the endpoints payrail disabled after failing for the whole retry window.
pub async fn webhook_endpoints(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let q = super::payments::query(&req)?;
    let limit = super::payments::int_param(&q, "limit", 50, 1, 1000)?;
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some(s @ ("enabled" | "disabled")) => Some(s),
        Some(_) => return Err(ApiError::param("status", "status must be enabled or disabled")),
    };
    let mut rows = state.db.all_endpoints(status, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let data: Vec<serde_json::Value> = rows
        .iter()
        .map(|e| {
            let mut v = super::webhook_endpoints::endpoint_object(e);
            v["merchant_id"] = e.merchant_id.clone().into();
            v
        })
        .collect();
    Ok(json_value(200, &crate::domain::record::list_object(data, more)))
}

/// `POST /admin/v1/dead_letters/{id}/replay`: publishes a dead letter's envelope to its
/// partition again (under a message id of its own, so JetStream's duplicate window does not
/// swallow it) and marks it replayed. Idempotent in effect: the event is still applied at
/// most once (its `processed_events` row), so replaying twice changes nothing twice.
pub async fn replay_dead_letter(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let id = req
        .match_info()
        .get("id")
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(ApiError::NotFound("dead letter"))?;
    let envelope = state
        .db
        .dead_letter_envelope(id)
        .await?
        .ok_or(ApiError::NotFound("dead letter"))?
        .ok_or_else(|| {
            ApiError::invalid(
                "dead_letter_not_replayable",
                "this dead letter's envelope was unreadable; it cannot be replayed",
                None,
            )
        })?;
    let event: crate::adapters::nats::PspEvent = rmp_serde::from_slice(&envelope).map_err(|_| ApiError::Internal)?;
    let message_id = format!("{}:replay:{id}:{}", event.event_id, uuid::Uuid::new_v4().simple());
    let timeout = std::time::Duration::from_millis(state.config.nats.publish_timeout_ms);
    state
        .nats
        .publish_psp_event_as(&event, &message_id, state.config.nats.partitions, timeout)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "replaying a dead letter");
            ApiError::Unavailable("nats")
        })?;
    // Marked only once JetStream has it again: a failed publish leaves it unreplayed.
    state.db.mark_dead_letter_replayed(id).await?;
    state.metrics.psp_event(&event.provider, "replayed");
    Ok(json_value(
        200,
        &serde_json::json!({ "object": "dead_letter_replay", "id": id, "event_id": event.event_id,
                             "event_type": event.event_type, "replayed": true }),
    ))
}
