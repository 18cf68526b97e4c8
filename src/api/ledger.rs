//! The merchant's view of the ledger: balances and a payment's journals.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::payments::query;
use super::{auth, json_value, AppState};
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::PaymentId;

/// `GET /api/v1/balance`
pub async fn balance(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let balances = state.db.merchant_balances(&merchant.id).await?;
    Ok(json_value(200, &json!({ "object": "balance", "balances": balances })))
}

/// `GET /api/v1/ledger/journals?payment_id=…`
pub async fn journals(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let raw = q
        .get("payment_id")
        .ok_or_else(|| ApiError::invalid("parameter_missing", "payment_id is required", "payment_id".to_owned()))?;
    let id = PaymentId::parse(raw).ok_or(ApiError::NotFound("payment"))?;
    state
        .db
        .payment_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    let journals = state.db.journals_of_payment(&id).await?;
    Ok(json_value(200, &list_object(journals, false)))
}
