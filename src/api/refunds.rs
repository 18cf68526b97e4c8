//! Refund reads. Creating one is an operation on its payment (`payments::refund`).

use actix_web::{web, HttpRequest, HttpResponse};

use super::payments::path_id;
use super::{auth, json_value, AppState};
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::{Refund, RefundId};

/// `GET /api/v1/payments/{id}/refunds`
pub async fn list_for_payment(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_id(&req)?;
    state
        .db
        .payment_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    let q = super::payments::query(&req)?;
    let limit = super::payments::int_param(&q, "limit", 100, 1, 100)?;
    let after = match q.get("starting_after") {
        None => None,
        Some(s) => Some(
            RefundId::parse(s)
                .ok_or_else(|| ApiError::param("starting_after", "starting_after must be a refund id"))?,
        ),
    };
    let (refunds, more) = state.db.refunds_of_payment(&id, limit, after.as_ref()).await?;
    Ok(json_value(
        200,
        &list_object(refunds.iter().map(Refund::to_object).collect(), more),
    ))
}

/// `GET /api/v1/refunds/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = req
        .match_info()
        .get("id")
        .and_then(RefundId::parse)
        .ok_or(ApiError::NotFound("refund"))?;
    let refund = state
        .db
        .refund_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("refund"))?;
    Ok(json_value(200, &refund.to_object()))
}
