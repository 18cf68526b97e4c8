//! `/api/v1/transfers`: a platform sends part of its balance to one of its sellers, and takes
//! it back (docs/API.md, "Transfers").

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::{self, Fields};
use super::payments::{int_param, query};
use super::{auth, idempotency, json_value, AppState};
use crate::adapters::postgres::transfers::{Moved, Transfer};
use crate::api::error::ApiError;
use crate::domain::record::{list_object, now};
use crate::domain::{AccountId, Currency, PaymentId, MAX_AMOUNT};

fn path_transfer(req: &HttpRequest) -> Result<String, ApiError> {
    super::path_id_with(req, "tr_", "transfer")
}

/// Whether `found`, made by an earlier request with the key, is the transfer `asked` describes.
fn same_transfer(found: &Transfer, asked: &Transfer) -> bool {
    (
        found.amount,
        &found.currency,
        &found.destination,
        &found.source_payment,
        &found.transfer_group,
    ) == (
        asked.amount,
        &asked.currency,
        &asked.destination,
        &asked.source_payment,
        &asked.transfer_group,
    )
}

fn insufficient() -> ApiError {
    ApiError::invalid(
        "balance_insufficient",
        "the platform's balance in this currency does not cover the transfer",
        None,
    )
}

/// `POST /api/v1/transfers`: `{ amount, currency, destination, source_payment?,
/// transfer_group?, metadata? }`.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let id = idempotency::derived_id("tr", merchant.id.as_str(), &key);
    let parsed = (|| {
        let obj = body::object(&body)?;
        let f = Fields::new(
            &obj,
            &[
                "amount",
                "currency",
                "destination",
                "source_payment",
                "transfer_group",
                "metadata",
            ],
            "",
        )?;
        let amount = f
            .opt_int("amount", 1, MAX_AMOUNT)?
            .ok_or_else(|| ApiError::invalid("parameter_missing", "amount is required", "amount".to_owned()))?;
        let currency = Currency::parse(f.req_str("currency", 3)?)
            .filter(|c| state.currencies.contains(c))
            .ok_or_else(|| ApiError::param("currency", "currency is not a currency this deployment accepts"))?;
        let destination = AccountId::parse(f.req_str("destination", 80)?)
            .ok_or_else(|| ApiError::param("destination", "destination must be an account id (acct_…)"))?;
        let source_payment = match f.opt_str("source_payment", 80)? {
            None => None,
            Some(s) => Some(
                PaymentId::parse(s)
                    .ok_or_else(|| ApiError::param("source_payment", "source_payment must be a payment id"))?,
            ),
        };
        let metadata = f.opt_metadata("metadata")?.unwrap_or_default();
        Ok(Transfer {
            id: id.clone(),
            platform_id: merchant.id.clone(),
            destination,
            amount,
            currency: currency.code().to_owned(),
            amount_reversed: 0,
            source_payment: source_payment.map(|p| p.to_string()),
            transfer_group: f.opt_str("transfer_group", 64)?.map(str::to_owned),
            metadata: serde_json::to_value(metadata).map_err(|_| ApiError::Internal)?,
            created_at: now(),
        })
    })();
    let (st, m) = (&state, &merchant);
    idempotency::run(&state, &merchant, &req, key, &body, parsed, |t, _| async move {
        let account = st
            .db
            .account(&m.id, &t.destination)
            .await?
            .ok_or_else(|| ApiError::invalid("resource_missing", "no such account", "destination".to_owned()))?;
        if !account.receives_funds() {
            return Err(ApiError::invalid(
                "account_inactive",
                "the account does not receive funds (it is restricted or disabled)",
                "destination".to_owned(),
            ));
        }
        if let Some(p) = t.source_payment.as_deref().and_then(PaymentId::parse) {
            st.db
                .payment_for_merchant(&m.id, &p)
                .await?
                .ok_or_else(|| ApiError::invalid("resource_missing", "no such payment", "source_payment".to_owned()))?;
        }
        match st.db.create_transfer(&t).await? {
            Moved::Created(t) => idempotency::reply_json(201, &t.to_object()),
            // Made by an earlier request with this key whose record expired: the same transfer
            // is found again, another one is not answered as if it had been made.
            Moved::Existing(found) if same_transfer(&found, &t) => idempotency::reply_json(200, &found.to_object()),
            Moved::Existing(_) | Moved::Reused => Err(ApiError::IdempotencyKeyReused),
            Moved::Insufficient | Moved::Uncovered => Err(insufficient()),
            Moved::NotFound => Err(ApiError::NotFound("transfer")),
            Moved::Inactive => Err(ApiError::invalid(
                "account_inactive",
                "the destination account is not active",
                "destination".to_owned(),
            )),
        }
    })
    .await
}

/// `GET /api/v1/transfers?limit=&starting_after=`: newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let after = q.get("starting_after").map(String::as_str);
    let (list, more) = state.db.list_transfers(&merchant.id, limit, after).await?;
    Ok(json_value(
        200,
        &list_object(list.iter().map(Transfer::to_object).collect(), more),
    ))
}

/// `GET /api/v1/transfers/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_transfer(&req)?;
    let t = state
        .db
        .transfer(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("transfer"))?;
    Ok(json_value(200, &t.to_object()))
}

/// `POST /api/v1/transfers/{id}/reversals`: `{ amount? }` (default: what is left).
pub async fn reverse(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let reversal_id = idempotency::derived_id("trr", merchant.id.as_str(), &key);
    let parsed = (|| {
        let id = path_transfer(&req)?;
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["amount"], "")?;
        Ok((id, f.opt_int("amount", 1, MAX_AMOUNT)?))
    })();
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(id, amount), _| async move {
            match st.db.reverse_transfer(&m.id, &id, &reversal_id, amount).await? {
                Moved::Created((t, r)) => idempotency::reply_json(201, &r.to_object(&t)),
                // The same reversal: of this amount, or, asked without one (all that is left),
                // one after which nothing is left.
                Moved::Existing((t, r)) if amount.map_or(t.amount_reversed == t.amount, |a| a == r.amount) => {
                    idempotency::reply_json(200, &r.to_object(&t))
                }
                Moved::Existing(_) | Moved::Reused => Err(ApiError::IdempotencyKeyReused),
                Moved::Insufficient => Err(ApiError::invalid(
                    "amount_too_large",
                    "the amount is more than what is left of the transfer",
                    "amount".to_owned(),
                )),
                Moved::Uncovered => Err(ApiError::invalid(
                    "balance_insufficient",
                    "the seller's available balance does not cover the reversal",
                    amount.map(|_| "amount".to_owned()),
                )),
                Moved::NotFound | Moved::Inactive => Err(ApiError::NotFound("transfer")),
            }
        },
    )
    .await
}
