//! `/api/v1/events`: every committed change as an event (docs/API.md, "Events"), kept for
//! `[webhooks_out] event_retention_days`; and redelivery to webhook endpoints.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::body::{self, Fields};
use super::payments::{int_param, query, time_param};
use super::{auth, idempotency, json_value, AppState};
use crate::adapters::postgres::webhooks_out::EventFilter;
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::webhook::{event_id, parse_event_id, valid_event_pattern, wants};

fn path_event(req: &HttpRequest) -> Result<i64, ApiError> {
    req.match_info()
        .get("id")
        .and_then(parse_event_id)
        .ok_or(ApiError::NotFound("event"))
}

/// `GET /api/v1/events?limit=&starting_after=evt_…&type=&created[gte]=`: newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let mut filter = EventFilter {
        limit: int_param(&q, "limit", 10, 1, 100)?,
        ..EventFilter::default()
    };
    if let Some(s) = q.get("starting_after") {
        filter.starting_after = Some(
            parse_event_id(s).ok_or_else(|| ApiError::param("starting_after", "starting_after must be an event id"))?,
        );
    }
    match q.get("type").map(String::as_str) {
        None | Some("*") => {}
        Some(t) if valid_event_pattern(t) => match t.strip_suffix('*') {
            Some(family) => filter.type_prefix = Some(family.to_owned()),
            None => filter.event_type = Some(t.to_owned()),
        },
        Some(_) => {
            return Err(ApiError::param(
                "type",
                "type must be an event type such as payment.captured, or a family such as payment.*",
            ))
        }
    }
    filter.created_gte = time_param(&q, "created[gte]")?;
    let (events, more) = state.db.list_events(&merchant.id, &filter).await?;
    Ok(json_value(
        200,
        &list_object(events.iter().map(|e| e.to_object()).collect(), more),
    ))
}

/// `GET /api/v1/events/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_event(&req)?;
    let event = state
        .db
        .event(&merchant.id, id)
        .await?
        .ok_or(ApiError::NotFound("event"))?;
    Ok(json_value(200, &event.to_object()))
}

/// `POST /api/v1/events/{id}/redeliver`: `{ "endpoint": "we_…" }` sends the event to that
/// endpoint again; without it, to every enabled endpoint that takes its type. Each gets a
/// fresh retry window.
pub async fn redeliver(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = path_event(&req).and_then(|id| {
        let endpoint = if body.is_empty() {
            None
        } else {
            let obj = body::object(&body)?;
            let f = Fields::new(&obj, &["endpoint"], "")?;
            f.opt_str("endpoint", 64)?.map(str::to_owned)
        };
        Ok((id, endpoint))
    });
    let window = Duration::from_secs(state.config.webhooks_out.retry_window_secs);
    let (st, m) = (&state, &merchant);
    idempotency::run(&state, &merchant, &req, key, &body, parsed, |(id, endpoint), _| async move {
        let event = st.db.event(&m.id, id).await?.ok_or(ApiError::NotFound("event"))?;
        let endpoints = st.db.endpoints(m.id.as_str()).await?;
        let targets: Vec<String> = match &endpoint {
            Some(wanted) => {
                let e = endpoints
                    .iter()
                    .find(|e| &e.id == wanted)
                    .ok_or(ApiError::NotFound("webhook endpoint"))?;
                if e.status != "enabled" {
                    return Err(ApiError::invalid(
                        "endpoint_disabled",
                        "the endpoint is disabled; enable it first (POST /api/v1/webhook_endpoints/{id} with disabled=false)",
                        "endpoint".to_owned(),
                    ));
                }
                vec![e.id.clone()]
            }
            None => endpoints
                .iter()
                .filter(|e| e.status == "enabled" && wants(&e.enabled_events, &event.event_type))
                .map(|e| e.id.clone())
                .collect(),
        };
        st.db.redeliver(event.id, &targets, window).await?;
        let object = json!({ "object": "event_redelivery", "event_id": event_id(event.id), "endpoints": targets });
        idempotency::reply_json(200, &object)
    })
    .await
}
