//! `/api/v1/accounts`: a platform's connected (seller) accounts and their balances
//! (docs/API.md, "Connected accounts"). A platform sees only its own accounts: another's is a
//! 404, as one that does not exist.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::body::{self, Fields};
use super::payments::{int_param, query};
use super::{auth, idempotency, json_value, AppState};
use crate::adapters::postgres::accounts::{Account, AccountUpdate, MAX_PAGE};
use crate::api::error::ApiError;
use crate::domain::record::{list_object, now};
use crate::domain::{AccountId, Currency};

const STATUSES: &[&str] = &["active", "restricted", "disabled"];
const INTERVALS: &[&str] = &["manual", "daily", "weekly"];

fn path_account(req: &HttpRequest) -> Result<AccountId, ApiError> {
    req.match_info()
        .get("id")
        .and_then(AccountId::parse)
        .ok_or(ApiError::NotFound("account"))
}

fn one_of(f: &Fields<'_>, field: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
    match f.opt_str(field, 32)? {
        None => Ok(None),
        Some(s) if allowed.contains(&s) => Ok(Some(s.to_owned())),
        Some(_) => Err(ApiError::param(
            field,
            format!("{field} must be one of {}", allowed.join(", ")),
        )),
    }
}

/// A payout schedule's fields as given: interval, delay in days, minimum.
type Schedule = (Option<String>, Option<i32>, Option<i64>);

/// `payout_schedule`: `{ interval?, delay_days?, minimum? }`.
fn payout_schedule(obj: &Map<String, Value>) -> Result<Schedule, ApiError> {
    let Some(v) = obj.get("payout_schedule").filter(|v| !v.is_null()) else {
        return Ok((None, None, None));
    };
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::param("payout_schedule", "payout_schedule must be an object"))?;
    let f = Fields::new(o, &["interval", "delay_days", "minimum"], "payout_schedule.")?;
    Ok((
        one_of(&f, "interval", INTERVALS)?,
        f.opt_int("delay_days", 0, 30)?.map(|d| d as i32),
        f.opt_int("minimum", 0, crate::domain::MAX_AMOUNT)?,
    ))
}

/// `bank_account`: a token of the payout rail (docs/API.md, "Payouts").
pub fn bank_account(f: &Fields<'_>) -> Result<Option<String>, ApiError> {
    match f.opt_str("bank_account", 64)? {
        Some(b) if !crate::adapters::psp::sandbox::BANK_TOKENS.contains(&b) => Err(ApiError::param(
            "bank_account",
            format!(
                "bank_account must be a bank account token: {}",
                crate::adapters::psp::sandbox::BANK_TOKENS.join(", ")
            ),
        )),
        b => Ok(b.map(str::to_owned)),
    }
}

fn email(f: &Fields<'_>) -> Result<Option<String>, ApiError> {
    match f.opt_str("email", 254)? {
        Some(e) if !e.contains('@') || e.chars().any(char::is_whitespace) => {
            Err(ApiError::param("email", "email must be an email address"))
        }
        e => Ok(e.map(str::to_owned)),
    }
}

/// `POST /api/v1/accounts`: `{ name, country, default_currency, email?, status?,
/// payout_schedule?, metadata? }`.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    // The account's id comes from the idempotency key: a retry finds the account the first made.
    let id = AccountId::from_trusted(idempotency::derived_id("acct", merchant.id.as_str(), &key));
    let parsed = (|| {
        let obj = body::object(&body)?;
        let f = Fields::new(
            &obj,
            &[
                "name",
                "email",
                "country",
                "default_currency",
                "status",
                "payout_schedule",
                "metadata",
                "bank_account",
            ],
            "",
        )?;
        let country = f.req_str("country", 2)?;
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ApiError::param(
                "country",
                "country must be an ISO 3166-1 alpha-2 code, upper case",
            ));
        }
        let currency = f.req_str("default_currency", 3)?;
        let currency = Currency::parse(currency)
            .filter(|c| state.currencies.contains(c))
            .ok_or_else(|| {
                ApiError::param(
                    "default_currency",
                    "default_currency is not a currency this deployment accepts",
                )
            })?;
        let (interval, delay, minimum) = payout_schedule(&obj)?;
        let at = now();
        Ok(Account {
            id: id.clone(),
            platform_id: merchant.id.clone(),
            name: f.req_str("name", 200)?.to_owned(),
            email: email(&f)?,
            country: country.to_owned(),
            default_currency: currency.code().to_owned(),
            status: one_of(&f, "status", STATUSES)?.unwrap_or_else(|| "active".into()),
            payout_interval: interval.unwrap_or_else(|| "daily".into()),
            payout_delay_days: delay.unwrap_or(2),
            payout_minimum: minimum.unwrap_or(0),
            metadata: f.opt_metadata("metadata")?.unwrap_or_default(),
            created_at: at,
            updated_at: at,
            bank_account: bank_account(&f)?.unwrap_or_else(|| "ba_success".into()),
        })
    })();
    let st = &state;
    idempotency::run(&state, &merchant, &req, key, &body, parsed, |account, _| async move {
        let (stored, created) = st.db.insert_account(&account).await?;
        idempotency::reply_json(if created { 201 } else { 200 }, &stored.to_object())
    })
    .await
}

/// `GET /api/v1/accounts?limit=&starting_after=`: newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, MAX_PAGE)?;
    let after = match q.get("starting_after") {
        None => None,
        Some(s) => Some(
            AccountId::parse(s)
                .ok_or_else(|| ApiError::param("starting_after", "starting_after must be an account id"))?,
        ),
    };
    let (accounts, more) = state.db.list_accounts(&merchant.id, limit, after.as_ref()).await?;
    Ok(json_value(
        200,
        &list_object(accounts.iter().map(Account::to_object).collect(), more),
    ))
}

/// `GET /api/v1/accounts/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_account(&req)?;
    let account = state
        .db
        .account(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("account"))?;
    Ok(json_value(200, &account.to_object()))
}

/// `POST /api/v1/accounts/{id}`: `{ name?, email?, status?, payout_schedule?, metadata? }`.
pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = (|| {
        let id = path_account(&req)?;
        let obj = body::object(&body)?;
        let f = Fields::new(
            &obj,
            &["name", "email", "status", "payout_schedule", "metadata", "bank_account"],
            "",
        )?;
        let (interval, delay, minimum) = payout_schedule(&obj)?;
        Ok((
            id,
            AccountUpdate {
                name: f.opt_str("name", 200)?.map(str::to_owned),
                email: email(&f)?,
                status: one_of(&f, "status", STATUSES)?,
                payout_interval: interval,
                payout_delay_days: delay,
                payout_minimum: minimum,
                metadata: f.opt_metadata("metadata")?,
                bank_account: bank_account(&f)?,
            },
        ))
    })();
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(id, update), _| async move {
            let account = st
                .db
                .update_account(&m.id, &id, &update)
                .await?
                .ok_or(ApiError::NotFound("account"))?;
            idempotency::reply_json(200, &account.to_object())
        },
    )
    .await
}

/// `GET /api/v1/accounts/{id}/balance`: per currency, what the seller has pending (captured,
/// not yet available) and available (may be negative: a refund or dispute after its funds
/// were paid out, carried until new funds cover it).
pub async fn balance(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_account(&req)?;
    state
        .db
        .account(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("account"))?;
    let balances = state.db.account_balances(&id).await?;
    let reserved = state.db.payouts_in_flight(&merchant.id, Some(&id)).await?;
    let side = |pick: fn(&(String, i64, i64)) -> i64| {
        balances
            .iter()
            .map(|b| json!({ "currency": b.0, "amount": pick(b) }))
            .collect::<Vec<_>>()
    };
    Ok(json_value(
        200,
        &json!({
            "object": "balance",
            "account": id,
            "pending": side(|b| b.1),
            "available": side(|b| b.2),
            "reserved": reserved.iter().map(|(c, a)| json!({ "currency": c, "amount": a })).collect::<Vec<_>>(),
        }),
    ))
}
