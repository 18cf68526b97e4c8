//! `/api/v1/disputes`: chargebacks, opened and closed by the PSP's events.

use actix_web::{web, HttpRequest, HttpResponse};

use super::payments::query;
use super::{auth, json_value, AppState};
use crate::api::error::ApiError;
use crate::domain::record::list_object;
use crate::domain::{Dispute, DisputeId};

/// `GET /api/v1/disputes`, newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = super::payments::int_param(&q, "limit", 10, 1, 100)?;
    let (disputes, more) = state.db.disputes_of_merchant(&merchant.id, limit).await?;
    Ok(json_value(
        200,
        &list_object(disputes.iter().map(Dispute::to_object).collect(), more),
    ))
}

/// `GET /api/v1/disputes/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = req
        .match_info()
        .get("id")
        .and_then(DisputeId::parse)
        .ok_or(ApiError::NotFound("dispute"))?;
    let d = state
        .db
        .dispute_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("dispute"))?;
    Ok(json_value(200, &d.to_object()))
}
