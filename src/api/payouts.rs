//! `/api/v1/payouts`: a seller's available funds, or the platform's own balance, sent to a bank
//! account (docs/API.md, "Payouts").

use actix_web::{web, HttpRequest, HttpResponse};

use super::accounts::bank_account;
use super::body::{self, Fields};
use super::payments::{int_param, query};
use super::{auth, idempotency, json_value, AppState};
use crate::adapters::postgres::payouts::Payout;
use crate::adapters::postgres::transfers::Moved;
use crate::api::error::ApiError;
use crate::domain::record::{list_object, now};
use crate::domain::{AccountId, Currency, MAX_AMOUNT};

fn path_payout(req: &HttpRequest) -> Result<String, ApiError> {
    super::path_id_with(req, "po_", "payout")
}

/// Hands a payout to the payout rail: `in_transit` is committed first (from then on it cannot
/// be canceled), then the rail is called. A payout whose `in_transit` did not commit stays
/// `pending` (cancelable: the rail never saw it) for the sweeper; a rail that does not answer
/// leaves it `in_transit`, handed again by the sweeper. Returns the payout as it stands.
pub async fn submit(state: &AppState, p: Payout) -> Payout {
    let Some(rail) = rail(state) else { return p };
    let moved = match state.db.payout_in_transit(&p.id).await {
        Ok(Some(moved)) => moved,
        Ok(None) => return p,
        Err(e) => {
            tracing::warn!(payout = %p.id, error = %e, "payout not handed to the rail yet; it stays pending");
            return p;
        }
    };
    if moved.status == "in_transit" {
        if let Err(e) = rail.submit_payout(&p.id, p.amount, &p.currency, &p.bank_account) {
            tracing::warn!(payout = %p.id, error = %e, "the payout rail did not take the payout; handed again later");
        }
    }
    moved
}

/// The payout rail, if this deployment has one that can report outcomes.
fn rail(state: &AppState) -> Option<&crate::adapters::psp::sandbox::SandboxPsp> {
    state.sandbox.as_deref().filter(|s| s.pays_out())
}

/// `POST /api/v1/payouts`: `{ amount, currency, account?, bank_account? }`; without `account`,
/// the platform's own balance is paid out.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let id = idempotency::derived_id("po", merchant.id.as_str(), &key);
    let parsed = (|| {
        let obj = body::object(&body)?;
        let f = Fields::new(&obj, &["amount", "currency", "account", "bank_account"], "")?;
        let amount = f
            .opt_int("amount", 1, MAX_AMOUNT)?
            .ok_or_else(|| ApiError::invalid("parameter_missing", "amount is required", "amount".to_owned()))?;
        let currency = Currency::parse(f.req_str("currency", 3)?)
            .filter(|c| state.currencies.contains(c))
            .ok_or_else(|| ApiError::param("currency", "currency is not a currency this deployment accepts"))?;
        let account = match f.opt_str("account", 80)? {
            None => None,
            Some(a) => Some(
                AccountId::parse(a)
                    .ok_or_else(|| ApiError::param("account", "account must be an account id (acct_…)"))?,
            ),
        };
        let at = now();
        Ok((
            Payout {
                id: id.clone(),
                platform_id: merchant.id.clone(),
                account,
                amount,
                currency: currency.code().to_owned(),
                status: "pending".into(),
                bank_account: String::new(),
                automatic: false,
                failure_code: None,
                created_at: at,
                updated_at: at,
            },
            bank_account(&f)?,
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
        |(mut p, bank), _| async move {
            if rail(st).is_none() {
                return Err(ApiError::Unavailable("the payout rail"));
            }
            let asked_bank = bank.clone();
            p.bank_account = match &p.account {
                Some(a) => {
                    let account = st.db.account(&m.id, a).await?.ok_or_else(|| {
                        ApiError::invalid("resource_missing", "no such account", "account".to_owned())
                    })?;
                    if account.status == "disabled" {
                        return Err(ApiError::invalid(
                            "account_inactive",
                            "a disabled account is not paid out",
                            "account".to_owned(),
                        ));
                    }
                    bank.unwrap_or(account.bank_account)
                }
                None => bank.unwrap_or_else(|| "ba_success".into()),
            };
            match st.db.create_payout(&p).await? {
                Moved::Created(p) => idempotency::reply_json(201, &submit(st, p).await.to_object()),
                // Made by an earlier request with this key whose record expired: the same payout
                // is found again, another one is not answered as if it had been made.
                // (A bank account not given is the account's default, which may have changed since.)
                Moved::Existing(found)
                    if (found.amount, &found.currency, &found.account) == (p.amount, &p.currency, &p.account)
                        && asked_bank.is_none_or(|b| b == found.bank_account) =>
                {
                    idempotency::reply_json(200, &found.to_object())
                }
                Moved::Existing(_) | Moved::Reused => Err(ApiError::IdempotencyKeyReused),
                Moved::Insufficient | Moved::Uncovered => Err(ApiError::invalid(
                    "balance_insufficient",
                    "the available balance in this currency does not cover the payout",
                    None,
                )),
                Moved::NotFound => Err(ApiError::NotFound("payout")),
                Moved::Inactive => Err(ApiError::invalid(
                    "account_inactive",
                    "a disabled account is not paid out",
                    "account".to_owned(),
                )),
            }
        },
    )
    .await
}

/// `GET /api/v1/payouts?limit=&starting_after=`: newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let after = q.get("starting_after").map(String::as_str);
    let (list, more) = state.db.list_payouts(&merchant.id, limit, after).await?;
    Ok(json_value(
        200,
        &list_object(list.iter().map(Payout::to_object).collect(), more),
    ))
}

/// `GET /api/v1/payouts/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_payout(&req)?;
    let p = state
        .db
        .payout(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payout"))?;
    Ok(json_value(200, &p.to_object()))
}

/// `POST /api/v1/payouts/{id}/cancel`: only while `pending`; otherwise `409`.
pub async fn cancel(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = (|| {
        let id = path_payout(&req)?;
        let obj = body::object(&body)?;
        Fields::new(&obj, &[], "")?;
        Ok(id)
    })();
    let (st, m) = (&state, &merchant);
    idempotency::run(&state, &merchant, &req, key, &body, parsed, |id, _| async move {
        let p = st
            .db
            .cancel_payout(&m.id, &id)
            .await?
            .ok_or(ApiError::NotFound("payout"))?;
        if p.status != "canceled" {
            return Err(ApiError::Conflict {
                code: "payout_not_cancelable",
                message: "only a pending payout can be canceled",
            });
        }
        idempotency::reply_json(200, &p.to_object())
    })
    .await
}

/// Payouts the housekeeping tick makes and hands on, at most this many each.
const TICK_PAYOUTS: i64 = 1_000;

/// The payout part of the marketplace tick: the sellers' scheduled payouts for today (one per
/// account, currency and UTC day: the id is derived from them), and payouts the rail may not
/// have taken or answered handed to it again.
pub async fn housekeeping(state: &AppState) {
    let config = &state.config.marketplace;
    let Some(rail) = rail(state) else { return };
    if config.scheduled_payouts {
        match state.db.scheduled_payouts_due(TICK_PAYOUTS).await {
            Ok(due) => {
                for d in due {
                    let key = format!("scheduled:{}:{}:{}", d.account, d.currency, d.day);
                    let at = now();
                    let p = Payout {
                        id: idempotency::derived_id("po", d.platform.as_str(), &key),
                        platform_id: d.platform,
                        account: Some(d.account),
                        amount: d.available,
                        currency: d.currency,
                        status: "pending".into(),
                        bank_account: d.bank_account,
                        automatic: true,
                        failure_code: None,
                        created_at: at,
                        updated_at: at,
                    };
                    match state.db.create_payout(&p).await {
                        Ok(Moved::Created(p)) => {
                            submit(state, p).await;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "scheduled payout");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "scheduled payouts"),
        }
    }
    let stale = config.payout_recheck_secs.clamp(1, 86_400) as i64;
    match state.db.open_payouts(stale, TICK_PAYOUTS).await {
        Ok(open) => {
            for p in open {
                if p.status == "pending" {
                    // Never handed over: in transit first, then the rail.
                    submit(state, p).await;
                } else if let Err(e) = rail.submit_payout(&p.id, p.amount, &p.currency, &p.bank_account) {
                    tracing::warn!(payout = %p.id, error = %e, "the payout rail did not take the payout again");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "open payouts"),
    }
}
