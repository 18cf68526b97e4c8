//! `/api/v1/webhook_endpoints`: where a merchant's events are delivered (docs/API.md, "Webhook
//! endpoints"). The signing secret is shown once, when it is made (at creation and rotation).

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use rand::RngCore;
use serde_json::{json, Value};

use super::body::{self, Fields};
use super::payments::{int_param, query};
use super::{auth, idempotency, json_value, AppState};
use crate::adapters::http_out::{check_form, check_target};
use crate::adapters::postgres::webhooks_out::{DeliveryRow, EndpointRow, EndpointUpdate, MAX_ENDPOINTS};
use crate::api::error::ApiError;
use crate::domain::record::{list_object, timestamp};
use crate::domain::webhook::TargetError;
use crate::domain::webhook::{event_id, valid_event_pattern};

/// An endpoint as the API shows it: never its secrets.
pub fn endpoint_object(e: &EndpointRow) -> Value {
    json!({
        "object": "webhook_endpoint",
        "id": e.id,
        "url": e.url,
        "description": e.description,
        "enabled_events": e.enabled_events,
        "status": e.status,
        "disabled_reason": e.disabled_reason,
        "failing_since": e.failing_since.map(timestamp),
        "previous_secret_expires_at": e.previous_secret_expires_at.filter(|t| *t > chrono::Utc::now()).map(timestamp),
        "created_at": timestamp(e.created_at),
        "updated_at": timestamp(e.updated_at),
    })
}

/// The object with the current secret: only the answers that make one.
fn with_secret(e: &EndpointRow) -> Value {
    let mut v = endpoint_object(e);
    v["secret"] = json!(e.secret);
    v
}

/// A new signing secret: 32 bytes from the operating system's generator.
fn new_secret() -> String {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    format!("whsec_{}", hex::encode(raw))
}

fn path_endpoint(req: &HttpRequest) -> Result<String, ApiError> {
    super::path_id_with(req, "we_", "webhook endpoint")
}

/// `enabled_events`: 1 to 64 patterns (`*`, `payment.captured`, `refund.*`…), kept in order,
/// without repeats.
fn enabled_events(obj: &serde_json::Map<String, Value>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(v) = obj.get("enabled_events") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::param(
            "enabled_events",
            "enabled_events must be a list of 1 to 64 event types: \"*\", a type such as \"payment.captured\", or a family such as \"refund.*\"",
        )
    };
    let list = v.as_array().filter(|l| (1..=64).contains(&l.len())).ok_or_else(bad)?;
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        let s = item.as_str().filter(|s| valid_event_pattern(s)).ok_or_else(bad)?;
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    Ok(Some(out))
}

/// A target refused: 400 `url_invalid` with the reason, or 503 when the resolver did not answer.
pub fn url_error(e: TargetError) -> ApiError {
    match e {
        TargetError::ResolverUnavailable => ApiError::Unavailable("the DNS resolver"),
        e => ApiError::invalid("url_invalid", e.to_string(), "url".to_owned()),
    }
}

/// A URL of a form payrail may call (validation: no lookup, so that a retry of a request that
/// succeeded is answered from its idempotency record even when DNS is down).
fn url_of_form(state: &AppState, url: &str) -> Result<String, ApiError> {
    check_form(url, state.config.webhooks_out.allow_private_targets).map_err(url_error)?;
    Ok(url.to_owned())
}

/// Every address the URL's host resolves to is public (inside the operation); a resolver that
/// does not answer in time is a 503, not a verdict.
async fn url_resolves_publicly(state: &AppState, url: &str) -> Result<(), ApiError> {
    check_target(url, state.config.webhooks_out.allow_private_targets)
        .await
        .map_err(url_error)
}

/// `POST /api/v1/webhook_endpoints`: `{ url, enabled_events?, description? }`.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = (|| {
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["url", "enabled_events", "description"], "")?;
        let url = url_of_form(&state, f.req_str("url", 2048)?)?;
        let events = enabled_events(&obj)?.unwrap_or_else(|| vec!["*".to_owned()]);
        let description = f.opt_str("description", 500)?.map(str::to_owned);
        Ok((url, events, description))
    })();
    // The endpoint's id comes from the idempotency key: a retry finds the endpoint the first made.
    let id = idempotency::derived_id("we", merchant.id.as_str(), &key);
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(url, events, description), _| async move {
            url_resolves_publicly(st, &url).await?;
            let row = EndpointRow::new(id, m.id.as_str(), url, description, events, new_secret());
            let (stored, created) = st.db.insert_endpoint(&row).await?.ok_or_else(|| {
                ApiError::invalid(
                    "too_many_endpoints",
                    format!("a merchant has at most {MAX_ENDPOINTS} webhook endpoints"),
                    None,
                )
            })?;
            st.webhooks.cache.invalidate(m.id.as_str());
            if created {
                idempotency::reply_json(201, &with_secret(&stored))
            } else {
                // Made by an earlier request with this key whose record has expired: the
                // secret was shown then, and is not shown again.
                idempotency::reply_json(200, &endpoint_object(&stored))
            }
        },
    )
    .await
}

/// The endpoint a merchant created with a `webhook_url` starts with: every event; the object
/// with its secret.
pub async fn first_endpoint(state: &AppState, merchant: &str, url: &str) -> Result<Value, ApiError> {
    let row = EndpointRow::new(
        idempotency::derived_id("we", merchant, "webhook_url"),
        merchant,
        url.to_owned(),
        Some("the merchant's webhook_url".into()),
        vec!["*".into()],
        new_secret(),
    );
    let (stored, _) = state.db.insert_endpoint(&row).await?.ok_or(ApiError::Internal)?;
    state.webhooks.cache.invalidate(merchant);
    Ok(with_secret(&stored))
}

/// `GET /api/v1/webhook_endpoints`: oldest first (at most 16 exist).
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let rows = state.db.endpoints(merchant.id.as_str()).await?;
    Ok(json_value(
        200,
        &list_object(rows.iter().map(endpoint_object).collect(), false),
    ))
}

/// `GET /api/v1/webhook_endpoints/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_endpoint(&req)?;
    let row = state
        .db
        .endpoint(merchant.id.as_str(), &id)
        .await?
        .ok_or(ApiError::NotFound("webhook endpoint"))?;
    Ok(json_value(200, &endpoint_object(&row)))
}

/// `POST /api/v1/webhook_endpoints/{id}`: `{ url?, enabled_events?, description?, disabled? }`.
pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = (|| {
        let id = path_endpoint(&req)?;
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["url", "enabled_events", "description", "disabled"], "")?;
        let url = match f.opt_str("url", 2048)? {
            Some(u) => Some(url_of_form(&state, u)?),
            None => None,
        };
        let update = EndpointUpdate {
            url,
            enabled_events: enabled_events(&obj)?,
            description: f.opt_str("description", 500)?.map(str::to_owned),
            disabled: f.opt_bool("disabled")?,
        };
        Ok((id, update))
    })();
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(id, update), _| async move {
            match (&update.url, update.disabled) {
                (Some(url), _) => url_resolves_publicly(st, url).await?,
                // Enabling again: the stored URL is checked as a new one would be (one made
                // from a webhook_url by the migration never was).
                (None, Some(false)) => {
                    if let Some(row) = st.db.endpoint(m.id.as_str(), &id).await? {
                        url_of_form(st, &row.url)?;
                        url_resolves_publicly(st, &row.url).await?;
                    }
                }
                (None, _) => {}
            }
            let row = st
                .db
                .update_endpoint(m.id.as_str(), &id, &update)
                .await?
                .ok_or(ApiError::NotFound("webhook endpoint"))?;
            st.webhooks.cache.invalidate(m.id.as_str());
            idempotency::reply_json(200, &endpoint_object(&row))
        },
    )
    .await
}

/// `DELETE /api/v1/webhook_endpoints/{id}`: idempotent; the endpoint's delivery log goes too.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_endpoint(&req)?;
    state.db.delete_endpoint(merchant.id.as_str(), &id).await?;
    state.webhooks.cache.invalidate(merchant.id.as_str());
    Ok(json_value(
        200,
        &json!({ "object": "webhook_endpoint", "id": id, "deleted": true }),
    ))
}

/// `POST /api/v1/webhook_endpoints/{id}/rotate_secret`: a new secret, shown once; the old one
/// keeps signing beside it for `[webhooks_out] secret_overlap_secs` (24 h by default).
pub async fn rotate_secret(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = path_endpoint(&req).and_then(|id| {
        if !body.is_empty() {
            Fields::new(&body::object(&body)?, &[], "")?;
        }
        Ok(id)
    });
    let overlap = Duration::from_secs(state.config.webhooks_out.secret_overlap_secs);
    let (st, m, k) = (&state, &merchant, key.clone());
    idempotency::run(&state, &merchant, &req, key, &body, parsed, |id, _| async move {
        let row = st
            .db
            .rotate_endpoint_secret(m.id.as_str(), &id, &new_secret(), overlap, &k)
            .await?
            .ok_or(ApiError::NotFound("webhook endpoint"))?;
        st.webhooks.cache.invalidate(m.id.as_str());
        idempotency::reply_json(200, &with_secret(&row))
    })
    .await
}

fn delivery_object(d: &DeliveryRow) -> Value {
    let last = d.last_attempt_at.map(|at| {
        json!({
            "at": timestamp(at),
            "status_code": d.last_status_code,
            "latency_ms": d.last_latency_ms,
            "response_body": d.last_response,
            "error": d.last_error,
        })
    });
    json!({
        "object": "webhook_delivery",
        "id": format!("wd_{}", d.id),
        "endpoint_id": d.endpoint_id,
        "event_id": event_id(d.event_id),
        "event_type": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "next_retry_at": d.next_attempt_at.filter(|_| d.status == "pending" && d.attempts > 0).map(timestamp),
        "last_attempt": last,
        "created_at": timestamp(d.created_at),
        "delivered_at": d.delivered_at.map(timestamp),
    })
}

/// `GET /api/v1/webhook_endpoints/{id}/deliveries?limit=&starting_after=wd_…&status=`: the
/// delivery log, newest first.
pub async fn deliveries(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_endpoint(&req)?;
    state
        .db
        .endpoint(merchant.id.as_str(), &id)
        .await?
        .ok_or(ApiError::NotFound("webhook endpoint"))?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let after = match q.get("starting_after") {
        None => None,
        Some(s) => Some(
            s.strip_prefix("wd_")
                .and_then(|n| n.parse::<i64>().ok())
                .ok_or_else(|| ApiError::param("starting_after", "starting_after must be a delivery id"))?,
        ),
    };
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some(s @ ("pending" | "succeeded" | "failed")) => Some(s),
        Some(_) => return Err(ApiError::param("status", "status must be pending, succeeded or failed")),
    };
    let (rows, more) = state
        .db
        .list_deliveries(merchant.id.as_str(), &id, limit, after, status)
        .await?;
    Ok(json_value(
        200,
        &list_object(rows.iter().map(delivery_object).collect(), more),
    ))
}
