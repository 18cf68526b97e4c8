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
    let in_flight = state.db.payouts_in_flight(&merchant.id, None).await?;
    // Stripe's shape beside ours: what the merchant can transfer or pay out now (its payable
    // less what its pending refunds owe), and what is held (those refunds, its own payouts on
    // their way). A merchant's captured funds are its at capture: there is no pending stage
    // (sellers have one).
    let mut available = Vec::new();
    let mut pending_funds = Vec::new();
    let mut reserved: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for b in &balances {
        let currency = b["currency"].as_str().unwrap_or_default().to_owned();
        let payable = b["payable"].as_i64().unwrap_or(0);
        let pending = b["pending_refunds"].as_i64().unwrap_or(0);
        let spendable = payable.checked_sub(pending).ok_or(ApiError::Internal)?;
        available.push(json!({ "currency": currency, "amount": spendable }));
        // The same shape as a seller's balance: nothing of the merchant's own waits for a day.
        pending_funds.push(json!({ "currency": currency, "amount": 0 }));
        if pending != 0 {
            *reserved.entry(currency).or_default() += pending;
        }
    }
    for (currency, amount) in in_flight {
        let r = reserved.entry(currency).or_default();
        *r = r.checked_add(amount).ok_or(ApiError::Internal)?;
    }
    let reserved: Vec<_> = reserved
        .into_iter()
        .map(|(currency, amount)| json!({ "currency": currency, "amount": amount }))
        .collect();
    Ok(json_value(
        200,
        &json!({ "object": "balance", "balances": balances, "available": available, "pending": pending_funds,
                 "reserved": reserved }),
    ))
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
