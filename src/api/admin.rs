//! Operator endpoints under `/admin/v1`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::{self, Fields};
use super::{auth, json_value, AppState};
use crate::adapters::postgres::merchants::NewMerchant;
use crate::domain::Currency;
use crate::error::ApiError;

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
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(ApiError::param("webhook_url", "webhook_url must be an http(s) URL"));
        }
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
    Ok(json_value(201, &object))
}
