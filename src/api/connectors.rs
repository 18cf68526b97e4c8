//! Connectors and routing (docs/API.md, "Connectors" and "Routing"): an operator makes and
//! changes a merchant's connectors and its routing rules; every node's routing reads them
//! (the node that took the change forgets its cached copy at once, the others within
//! `[routing] cache_ms`). Credentials are sealed before they reach PostgreSQL and never come
//! back out through the API or a log.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::body::{self, Fields};
use super::{auth, json_value, AppState};
use crate::adapters::postgres::reconciliation::Connector;
use crate::adapters::postgres::routing::{ConnectorChange, NewConnector};
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::routing::RoutingRules;
use crate::domain::MerchantId;

/// Credential fields each PSP kind takes.
fn credential_fields(psp: &str) -> &'static [&'static str] {
    match psp {
        "stripe" => &["api_key", "webhook_secret", "api_base"],
        "adyen" => &["api_key", "merchant_account", "hmac_key", "api_base"],
        _ => &["webhook_secret"],
    }
}

fn merchant_of(req: &HttpRequest) -> Result<MerchantId, ApiError> {
    req.match_info()
        .get("id")
        .and_then(MerchantId::parse)
        .ok_or(ApiError::NotFound("merchant"))
}

fn connector_id_ok(id: &str) -> bool {
    id.len() > 4
        && id.len() <= 64
        && id.starts_with("mca_")
        && id[4..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The credentials object, checked, as the JSON text to seal.
fn credentials(obj: &Map<String, Value>, psp: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(v) = obj.get("credentials").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::param("credentials", "credentials must be an object"))?;
    let allowed = credential_fields(psp);
    for (k, v) in m {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::param(
                "credentials",
                format!("a {psp} connector's credentials take {}", allowed.join(", ")),
            ));
        }
        if !v.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 1024) {
            // The value is never echoed: only its name.
            return Err(ApiError::param(
                &format!("credentials.{k}"),
                "a credential is a string of 1 to 1024 characters",
            ));
        }
    }
    if let Some(base) = m.get("api_base").and_then(Value::as_str) {
        if !api_base_ok(base) {
            return Err(ApiError::param(
                "credentials.api_base",
                "api_base must be an https URL (or http on this machine), with no user information",
            ));
        }
    }
    serde_json::to_vec(m).map(Some).map_err(|_| ApiError::Internal)
}

/// A PSP's API base: over the internet only with TLS, plain HTTP only to this machine (a local
/// double); parsed, so that `http://127.0.0.1:1@elsewhere` is not taken for this machine.
fn api_base_ok(base: &str) -> bool {
    let Ok(uri) = base.parse::<awc::http::Uri>() else {
        return false;
    };
    let Some(authority) = uri.authority() else { return false };
    if authority.as_str().contains('@') || uri.query().is_some() {
        return false;
    }
    match uri.scheme_str() {
        Some("https") => true,
        Some("http") => matches!(authority.host(), "127.0.0.1" | "localhost" | "[::1]"),
        _ => false,
    }
}

/// Refuses credentials (given whole) without one a PSP cannot work without, naming it.
fn missing_credential(obj: &Map<String, Value>, psp: &str) -> Result<(), ApiError> {
    let given = obj.get("credentials").and_then(Value::as_object);
    match required_credentials(psp)
        .iter()
        .find(|k| !given.is_some_and(|g| g.contains_key(**k)))
    {
        Some(missing) => Err(ApiError::param(
            &format!("credentials.{missing}"),
            format!("a {psp} connector needs credentials.{missing}"),
        )),
        None => Ok(()),
    }
}

/// The credentials a PSP cannot work without.
fn required_credentials(psp: &str) -> &'static [&'static str] {
    match psp {
        "stripe" => &["api_key"],
        "adyen" => &["api_key", "merchant_account"],
        _ => &[],
    }
}

fn currencies(state: &AppState, obj: &Map<String, Value>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(v) = obj.get("currencies").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .filter(|l| l.len() <= 50)
        .ok_or_else(|| ApiError::param("currencies", "currencies must be a list of at most 50 codes"))?;
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        let code = c
            .as_str()
            .and_then(crate::domain::Currency::parse)
            .filter(|c| state.currencies.contains(c))
            .ok_or_else(|| ApiError::param("currencies", "each currency must be an accepted ISO 4217 code"))?;
        if !out.iter().any(|x: &String| x == code.code()) {
            out.push(code.code().to_owned());
        }
    }
    Ok(Some(out))
}

/// A sandbox connector's behaviour: `latency_ms` (0 to 60,000) and `failure_rate` (0 to 1,
/// the share of calls answered "503, not processed").
fn settings(obj: &Map<String, Value>, psp: &str) -> Result<Option<Value>, ApiError> {
    let Some(v) = obj.get("settings").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::param("settings", "settings must be an object"))?;
    if psp != "sandbox" && !m.is_empty() {
        return Err(ApiError::param("settings", "only a sandbox connector takes settings"));
    }
    let mut out = Map::new();
    for (k, v) in m {
        match k.as_str() {
            "latency_ms" => {
                let n = v
                    .as_u64()
                    .filter(|n| *n <= 60_000)
                    .ok_or_else(|| ApiError::param("settings.latency_ms", "0 to 60000"))?;
                out.insert(k.clone(), json!(n));
            }
            "failure_rate" => {
                let r = v
                    .as_f64()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| ApiError::param("settings.failure_rate", "0 to 1"))?;
                out.insert(k.clone(), json!(r));
            }
            _ => {
                return Err(ApiError::param(
                    "settings",
                    "a sandbox connector takes latency_ms and failure_rate",
                ))
            }
        }
    }
    Ok(Some(Value::Object(out)))
}

fn seal(state: &AppState, id: &str, plain: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(plain) = plain else { return Ok(None) };
    let sealer = state.connectors.sealer().ok_or_else(|| {
        ApiError::invalid(
            "secrets_not_configured",
            "this deployment has no [secrets] key (PAYRAIL__SECRETS__KEY): credentials cannot be stored",
            Some("credentials".to_owned()),
        )
    })?;
    sealer.seal(id, &plain).map(Some).map_err(|e| {
        tracing::error!(connector = %id, error = %e, "credentials could not be sealed");
        ApiError::Internal
    })
}

/// `POST /admin/v1/merchants/{id}/connectors`: `{connector_id?, psp, label, credentials?,
/// currencies?, enabled?, settings?}`. Idempotent by `connector_id`: the same id again answers
/// 200 with the connector as stored (changes go through the update).
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let merchant = merchant_of(&req)?;
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let obj = body::object(&body)?;
    let f = Fields::new(
        &obj,
        &[
            "connector_id",
            "psp",
            "label",
            "credentials",
            "currencies",
            "enabled",
            "settings",
        ],
        "",
    )?;
    let psp = f.req_str("psp", 16)?;
    if !matches!(psp, "sandbox" | "stripe" | "adyen") {
        return Err(ApiError::param("psp", "psp must be sandbox, stripe or adyen"));
    }
    let label = f.req_str("label", 100)?;
    let id = match f.opt_str("connector_id", 64)? {
        Some(id) if connector_id_ok(id) => id.to_owned(),
        Some(_) => {
            return Err(ApiError::param(
                "connector_id",
                "mca_ and up to 60 letters, digits or _",
            ))
        }
        None => format!("mca_{}", uuid::Uuid::now_v7().simple()),
    };
    let enabled = f.opt_bool("enabled")?.unwrap_or(true);
    let currencies = currencies(&state, &obj)?.unwrap_or_default();
    let settings = settings(&obj, psp)?.unwrap_or_else(|| json!({}));
    let plain = credentials(&obj, psp)?;
    missing_credential(&obj, psp)?;
    let sealed = seal(&state, &id, plain)?;
    if state.db.connectors_of(&merchant).await?.is_empty() {
        return Err(ApiError::NotFound("merchant"));
    }
    let (c, made) = state
        .db
        .insert_connector(NewConnector {
            id: &id,
            merchant: &merchant,
            psp,
            label,
            enabled,
            currencies: &currencies,
            settings: &settings,
            credentials: sealed.as_deref(),
        })
        .await?;
    if !made && (c.merchant_id != merchant || c.psp != psp) {
        return Err(ApiError::Conflict {
            code: "connector_id_taken",
            message: "another connector has this id",
        });
    }
    state.connectors.invalidate(&merchant);
    tracing::info!(merchant_id = %merchant, connector = %id, psp, made, "connector created");
    Ok(json_value(if made { 201 } else { 200 }, &c.to_object()))
}

/// `POST /admin/v1/merchants/{id}/connectors/{connector_id}`: changes `label`, `enabled`,
/// `currencies`, `settings` or `credentials` (replaced whole).
pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let merchant = merchant_of(&req)?;
    let id = req.match_info().get("connector_id").unwrap_or_default().to_owned();
    if !connector_id_ok(&id) {
        return Err(ApiError::NotFound("connector"));
    }
    let existing = state
        .db
        .connector(&id)
        .await?
        .filter(|c| c.merchant_id == merchant)
        .ok_or(ApiError::NotFound("connector"))?;
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let obj = body::object(&body)?;
    let f = Fields::new(&obj, &["label", "credentials", "currencies", "enabled", "settings"], "")?;
    let label = f.opt_str("label", 100)?;
    let enabled = f.opt_bool("enabled")?;
    let currencies = currencies(&state, &obj)?;
    let settings = settings(&obj, &existing.psp)?;
    let plain = credentials(&obj, &existing.psp)?;
    if plain.is_some() {
        missing_credential(&obj, &existing.psp)?;
    }
    let sealed = seal(&state, &id, plain)?;
    let c = state
        .db
        .update_connector(
            &merchant,
            &id,
            ConnectorChange {
                label,
                enabled,
                currencies: currencies.as_deref(),
                settings: settings.as_ref(),
                credentials: sealed.as_deref(),
            },
        )
        .await?
        .ok_or(ApiError::NotFound("connector"))?;
    state.connectors.invalidate(&merchant);
    tracing::info!(merchant_id = %merchant, connector = %id, "connector updated");
    Ok(json_value(200, &c.to_object()))
}

fn routing_object(merchant: &MerchantId, rules: &RoutingRules, version: i32) -> Value {
    json!({ "object": "routing", "merchant_id": merchant.as_str(), "version": version,
            "rules": rules.rules, "default": rules.default })
}

/// `GET /admin/v1/merchants/{id}/routing`
pub async fn get_routing(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let merchant = merchant_of(&req)?;
    if state.db.connectors_of(&merchant).await?.is_empty() {
        return Err(ApiError::NotFound("merchant"));
    }
    let (rules, version) = match state.db.routing_rules(&merchant).await? {
        Some((v, version)) => (serde_json::from_value(v).map_err(|_| ApiError::Internal)?, version),
        None => (RoutingRules::default(), 0),
    };
    Ok(json_value(200, &routing_object(&merchant, &rules, version)))
}

/// `PUT /admin/v1/merchants/{id}/routing`: `{rules: [...], default: [...]}` replaces the
/// merchant's routing whole; the same rules again change nothing (idempotent).
pub async fn put_routing(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let merchant = merchant_of(&req)?;
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let rules: RoutingRules = serde_json::from_slice(&body).map_err(|e| {
        let what = e.to_string();
        let what = if crate::domain::card::contains_pan(&what) {
            "malformed".to_owned()
        } else {
            what
        };
        ApiError::invalid(
            "parameter_invalid",
            format!("the routing rules do not parse: {what}"),
            None,
        )
    })?;
    let connectors = state.db.connectors_of(&merchant).await?;
    if connectors.is_empty() {
        return Err(ApiError::NotFound("merchant"));
    }
    let ids: Vec<&str> = connectors.iter().map(|c| c.id.as_str()).collect();
    rules
        .validate(&ids)
        .map_err(|e| ApiError::invalid("parameter_invalid", e.message, Some(e.param)))?;
    let stored = serde_json::to_value(&rules).map_err(|_| ApiError::Internal)?;
    let version = state.db.put_routing_rules(&merchant, &stored).await?;
    state.connectors.invalidate(&merchant);
    tracing::info!(merchant_id = %merchant, version, rules = rules.rules.len(), "routing rules replaced");
    Ok(json_value(200, &routing_object(&merchant, &rules, version)))
}

fn health_object(id: &str, psp: &str, state: &str, opened: u64, outage: bool) -> Value {
    json!({ "object": "connector_health", "id": id, "psp": psp, "breaker": state,
            "breaker_opened": opened, "outage": outage })
}

/// `GET /admin/v1/connectors`: every connector this node has called, with its circuit breaker.
pub async fn health(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    auth::operator(&state, &req)?;
    let data = state
        .connectors
        .breakers()
        .into_iter()
        .map(|(id, psp, st, opened, outage)| health_object(&id, psp, st, opened, outage))
        .collect();
    Ok(json_value(200, &list_object(data, false)))
}

/// `POST /sandbox/v1/connectors/{id}/outage` `{enabled}`: switches one of the calling
/// merchant's sandbox connectors into an outage (every call refused before it reaches the
/// sandbox) or out of it, on this node.
pub async fn sandbox_outage(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = req.match_info().get("id").unwrap_or_default().to_owned();
    let c: Connector = match connector_id_ok(&id) {
        true => state.db.connector(&id).await?,
        false => None,
    }
    .filter(|c| c.merchant_id == merchant.id)
    .ok_or(ApiError::NotFound("connector"))?;
    if c.psp != "sandbox" {
        return Err(ApiError::invalid(
            "connector_not_sandbox",
            "only a sandbox connector has an outage switch",
            None,
        ));
    }
    let body = body::read(&req, payload, 1024).await?;
    let obj = body::object(&body)?;
    let f = Fields::new(&obj, &["enabled"], "")?;
    let on = f
        .opt_bool("enabled")?
        .ok_or_else(|| ApiError::param("enabled", "enabled is required"))?;
    state.connectors.set_outage(&id, on);
    tracing::warn!(connector = %id, on, "sandbox connector outage switched");
    let (st, opened) = state
        .connectors
        .breakers()
        .into_iter()
        .find(|b| b.0 == id)
        .map(|b| (b.2, b.3))
        .unwrap_or(("closed", 0));
    Ok(json_value(200, &health_object(&id, "sandbox", st, opened, on)))
}

/// The connector's own webhook secret (`hmac_key` for Adyen), if its credentials hold one.
pub async fn webhook_secret(state: &AppState, c: &Connector) -> Result<Option<String>, ApiError> {
    if !c.has_credentials {
        return Ok(None);
    }
    use crate::adapters::connectors::CredentialsError;
    let creds = match state.connectors.credentials(&c.id).await {
        Ok(Some(creds)) => creds,
        Ok(None) => return Ok(None),
        // The PSP retries a 503: the key may be put right meanwhile.
        Err(CredentialsError::Unreadable) => return Err(ApiError::Unavailable("the connector's credentials")),
        Err(CredentialsError::Store(e)) => return Err(e.into()),
    };
    let field = if c.psp == "adyen" { "hmac_key" } else { "webhook_secret" };
    Ok(creds.get(field).and_then(Value::as_str).map(str::to_owned))
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_bases_are_parsed_not_matched_by_prefix() {
        for ok in [
            "https://api.stripe.com",
            "https://checkout-test.adyen.com/v71",
            "http://127.0.0.1:8420",
            "http://localhost:1/v71",
            "http://[::1]:9",
        ] {
            assert!(super::api_base_ok(ok), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:1@attacker.example/",
            "https://user:pw@api.stripe.com",
            "http://stripe.example",
            "ftp://127.0.0.1",
            "127.0.0.1:8420",
            "http://127.0.0.1.attacker.example",
            "",
        ] {
            assert!(!super::api_base_ok(bad), "{bad}");
        }
    }
}
