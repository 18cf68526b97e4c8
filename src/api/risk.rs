//! `/api/v1/risk`: a merchant's risk rules and lists (docs/API.md, "Risk"). A change takes
//! effect for the next payment at once: the risk engine forgets the merchant's cached rules.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::body::{self, Fields};
use super::{auth, idempotency, json_value, AppState};
use crate::actors::risk::{attribute_kind, ATTRIBUTES, DEFAULT_RULES};
use crate::adapters::postgres::risk::RiskRow;
use crate::api::error::ApiError;
use crate::domain::record::{list_object, timestamp};
use crate::domain::risk::{parse, RiskAction};

fn rule_object(r: &RiskRow) -> Value {
    json!({ "object": "risk_rule", "rule_id": r.id, "action": r.action, "predicate": r.predicate,
            "description": r.description, "default": false, "created_at": timestamp(r.created_at) })
}

/// Refuses a rule's or a list item's text that holds a card number, also written with the
/// separators a rule's numbers may carry: the parser reads `4242_4242_4242_4242` as one number,
/// and `'4242.4242.4242.4242'` is text a rule may hold. (Only here: ids and figures elsewhere
/// hold underscores and dots between digits that are no card.)
fn no_card_number(param: &str, text: &str) -> Result<(), ApiError> {
    body::no_card_data(param, text)?;
    body::no_card_data(param, &text.replace(['_', '.'], " "))
}

/// A predicate the engine can run: it parses, names only known attributes, holds no card
/// number, and has no part that can never hold.
fn checked_predicate(src: &str) -> Result<(), ApiError> {
    no_card_number("predicate", src)?;
    let invalid = |message: String| ApiError::invalid("predicate_invalid", message, "predicate".to_owned());
    let expr = parse(src).map_err(|e| invalid(format!("the predicate does not parse: {e}")))?;
    let (mut attrs, mut lists) = (Vec::new(), Vec::new());
    expr.names(&mut attrs, &mut lists);
    if let Some(a) = attrs.iter().find(|a| !ATTRIBUTES.contains(&a.as_str())) {
        let at = src.find(&format!(":{a}:")).unwrap_or(0);
        return Err(invalid(format!("unknown attribute :{a}: at position {at}")));
    }
    expr.check_kinds(&attribute_kind).map_err(invalid)
}

/// `POST /api/v1/risk/rules`: `{ "action", "predicate", "description"? }`.
pub async fn create_rule(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = (|| {
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["action", "predicate", "description"], "")?;
        let action = f.req_str("action", 16)?;
        let action = RiskAction::parse(action)
            .ok_or_else(|| ApiError::param("action", "action must be allow, block, review or request_3ds"))?;
        let predicate = f.req_str("predicate", crate::domain::risk::MAX_LEN)?.to_owned();
        checked_predicate(&predicate)?;
        let description = f.opt_str("description", 500)?.map(str::to_owned);
        Ok((action, predicate, description))
    })();
    // The rule's id comes from the idempotency key: a retry finds the rule the first made.
    let id = idempotency::derived_id("rr", merchant.id.as_str(), &key);
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(action, predicate, description), _ticket| async move {
            let row = st
                .db
                .insert_risk_rule(&m.id, &id, action.as_str(), &predicate, description.as_deref())
                .await?
                .ok_or_else(|| {
                    ApiError::invalid(
                        "too_many_rules",
                        format!(
                            "a merchant has at most {} rules",
                            crate::adapters::postgres::risk::MAX_RULES
                        ),
                        None,
                    )
                })?;
            st.risk.invalidate(&m.id);
            idempotency::reply_json(201, &rule_object(&row))
        },
    )
    .await
}

/// `GET /api/v1/risk/rules`: the built-in rules (when on), then the merchant's, oldest first.
pub async fn list_rules(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let mut data: Vec<Value> = Vec::new();
    if state.config.risk.default_rules {
        for (id, action, predicate) in DEFAULT_RULES {
            data.push(
                json!({ "object": "risk_rule", "rule_id": id, "action": action.as_str(), "predicate": predicate,
                              "description": "built in: card testing", "default": true, "created_at": null }),
            );
        }
    }
    data.extend(state.db.risk_rules(&merchant.id).await?.iter().map(rule_object));
    Ok(json_value(200, &list_object(data, false)))
}

/// `DELETE /api/v1/risk/rules/{id}`: idempotent; deleting twice answers the same.
pub async fn delete_rule(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = req
        .match_info()
        .get("id")
        .filter(|id| {
            id.starts_with("rr_") && id.len() <= 67 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .ok_or(ApiError::NotFound("risk rule"))?;
    if DEFAULT_RULES.iter().any(|(d, _, _)| *d == id) {
        return Err(ApiError::invalid(
            "rule_built_in",
            "a built-in rule cannot be deleted; an allow rule overrides it",
            None,
        ));
    }
    state.db.delete_risk_rule(&merchant.id, id).await?;
    state.risk.invalidate(&merchant.id);
    Ok(json_value(
        200,
        &json!({ "object": "risk_rule", "rule_id": id, "deleted": true }),
    ))
}

fn list_name(req: &HttpRequest) -> Result<String, ApiError> {
    req.match_info()
        .get("name")
        .filter(|n| !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(str::to_owned)
        .ok_or(ApiError::NotFound("risk list"))
}

/// Items are kept as the rules compare them: trimmed and in lower case, without a trailing dot
/// (a domain's, as payments' emails are kept).
fn list_item(raw: &str) -> Result<String, ApiError> {
    let item = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    if item.is_empty() || item.chars().count() > 256 {
        return Err(ApiError::param("item", "item must be 1 to 256 characters"));
    }
    no_card_number("item", &item)?;
    // An IP address in the one form payments store theirs (`::ffff:1.2.3.4` as 1.2.3.4, IPv6
    // compressed), so that `:ip: in @list` matches however either was written.
    Ok(crate::domain::risk::canonical_ip(&item))
}

/// `POST /api/v1/risk/lists/{name}/items`: `{ "item" }` (an email, IP, BIN, fingerprint,
/// country…). Adding an item twice changes nothing.
pub async fn add_item(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = list_name(&req).and_then(|name| {
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["item"], "")?;
        Ok((name, list_item(f.req_str("item", 256)?)?))
    });
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(name, item), _| async move {
            if !st.db.add_risk_list_item(&m.id, &name, &item).await? {
                return Err(ApiError::invalid(
                    "list_full",
                    format!(
                        "a list holds at most {} items",
                        crate::adapters::postgres::risk::MAX_LIST_ITEMS
                    ),
                    None,
                ));
            }
            st.risk.invalidate(&m.id);
            let object = json!({ "object": "risk_list_item", "list": name, "item": item });
            idempotency::reply_json(201, &object)
        },
    )
    .await
}

/// `GET /api/v1/risk/lists/{name}/items`: at most 1,000, in order.
pub async fn list_items(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let name = list_name(&req)?;
    let items = state.db.risk_list_items(&merchant.id, &name, 1_001).await?;
    let more = items.len() > 1_000;
    let data = items
        .iter()
        .take(1_000)
        .map(|i| json!({ "object": "risk_list_item", "list": name, "item": i }))
        .collect();
    Ok(json_value(200, &list_object(data, more)))
}

/// `DELETE /api/v1/risk/lists/{name}/items/{item}`: idempotent.
pub async fn delete_item(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let name = list_name(&req)?;
    let raw = req.match_info().get("item").unwrap_or_default();
    let item = list_item(raw)?;
    state.db.delete_risk_list_item(&merchant.id, &name, &item).await?;
    // An IP item stored before items were kept in one form goes by its own spelling too.
    let spelled = raw.trim().to_ascii_lowercase();
    if spelled != item {
        state.db.delete_risk_list_item(&merchant.id, &name, &spelled).await?;
    }
    state.risk.invalidate(&merchant.id);
    Ok(json_value(
        200,
        &json!({ "object": "risk_list_item", "list": name, "item": item, "deleted": true }),
    ))
}
