//! The sandbox PSP's own endpoints: what a browser SDK and a 3-D Secure page would do.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Datelike;
use serde_json::json;

use super::body::{self, Fields};
use super::{auth, json_value, AppState};
use crate::actors::{Op, PaymentCall};
use crate::api::error::ApiError;
use crate::domain::card::CardNumber;

/// `POST /sandbox/v1/payment_methods`: a test card becomes a `pm_…` token. The number lives
/// only inside this handler, in a `CardNumber` that cannot be printed.
pub async fn payment_methods(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let sandbox = state.sandbox.clone().ok_or(ApiError::NotFound("route"))?;
    let body = body::read(&req, payload, state.config.server.body_limit_bytes).await?;
    let obj = body::object(&body)?;
    drop(body);
    Fields::new(&obj, &["card"], "")?;
    let card = obj
        .get("card")
        .and_then(|c| c.as_object())
        .ok_or_else(|| ApiError::invalid("parameter_missing", "card is required", "card".to_owned()))?;
    let c = Fields::new(card, &["number", "exp_month", "exp_year", "cvc"], "card.")?;
    let pan = card
        .get("number")
        .and_then(|n| n.as_str())
        .and_then(CardNumber::parse)
        .ok_or_else(|| {
            ApiError::invalid(
                "card_number_invalid",
                "card.number is not a valid card number",
                "card.number".to_owned(),
            )
        })?;
    let today = chrono::Utc::now();
    let year = today.year() as i64;
    let exp_month = c
        .opt_int("exp_month", 1, 12)?
        .ok_or_else(|| ApiError::param("card.exp_month", "card.exp_month is required"))?;
    let exp_year = c
        .opt_int("exp_year", year, year + 20)?
        .ok_or_else(|| ApiError::param("card.exp_year", "card.exp_year is required"))?;
    if exp_year == year && exp_month < i64::from(today.month()) {
        return Err(ApiError::invalid(
            "card_expired",
            "the card has expired",
            "card.exp_month".to_owned(),
        ));
    }
    let cvc = card.get("cvc").and_then(|v| v.as_str()).unwrap_or("");
    if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid(
            "cvc_invalid",
            "card.cvc must be 3 or 4 digits",
            "card.cvc".to_owned(),
        ));
    }
    let stored = sandbox
        .tokenize(&merchant.id, pan, exp_month as i16, exp_year as i16)
        .await?;
    Ok(json_value(
        201,
        &json!({ "object": "payment_method", "id": stored.id,
                 "card": { "brand": stored.brand, "last4": stored.last4, "exp_month": stored.exp_month, "exp_year": stored.exp_year } }),
    ))
}

/// `POST /sandbox/v1/payments/{psp_reference}/complete_3ds`: the customer passes 3-D Secure.
pub async fn complete_3ds(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let sandbox = state.sandbox.clone().ok_or(ApiError::NotFound("route"))?;
    let reference = req
        .match_info()
        .get("reference")
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .ok_or(ApiError::NotFound("payment"))?;
    let payment = state
        .db
        .payment_by_psp_reference(&merchant.id, "sandbox", reference)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    if payment.status() != crate::domain::Status::RequiresAction {
        return Err(ApiError::InvalidState(payment.status()));
    }
    sandbox
        .complete_3ds(reference)
        .await
        .map_err(|_| ApiError::InvalidState(payment.status()))?;
    let reply = state
        .registry
        .call(&payment.id, PaymentCall::new(merchant.id.clone(), Op::Sync, None))
        .await?;
    Ok(super::json_response(reply.status, reply.body))
}
