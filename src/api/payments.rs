//! `/api/v1/payments`: create, confirm, capture, cancel, read, list, audit trail.

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};

use super::body::{self, Fields};
use super::{auth, idempotency, json_value, AppState};
use crate::actors::payment::RefundShare;
use crate::actors::payment_flow::Live;
use crate::actors::{Op, PaymentCall, Reply};
use crate::adapters::postgres::merchants::Merchant;
use crate::adapters::postgres::payments::PaymentFilter;
use crate::api::error::ApiError;
use crate::domain::marketplace::{SplitError, Splits, MAX_SPLITS};
use crate::domain::record::{list_object, now};
use crate::domain::{AccountId, CaptureStrategy, Currency, Payment, PaymentId, Status};

const CREATE_FIELDS: &[&str] = &[
    "order_id",
    "amount",
    "payment_method",
    "capture_strategy",
    "confirm",
    "customer_id",
    "description",
    "metadata",
    "customer",
    "splits",
    "application_fee_amount",
];

/// A payment id from the path; a malformed one names no payment, so it is a 404.
pub fn path_id(req: &HttpRequest) -> Result<PaymentId, ApiError> {
    req.match_info()
        .get("id")
        .and_then(PaymentId::parse)
        .ok_or(ApiError::NotFound("payment"))
}

/// The new payment a create request describes, validated before anything is stored.
fn new_payment(state: &AppState, merchant: &Merchant, body: &[u8]) -> Result<(Payment, bool), ApiError> {
    parse_create(body, merchant, &state.currencies, state.registry.deps().psp.name())
}

/// A create request's body as a new payment of `merchant` (and whether to confirm it at once),
/// in `currencies`, for `psp`: parsing and every validation, nothing stored. Public for the
/// hot-path benchmark (`benches/hot_path.rs`).
pub fn parse_create(
    body: &[u8],
    merchant: &Merchant,
    currencies: &[Currency],
    psp: &str,
) -> Result<(Payment, bool), ApiError> {
    let obj = body::object(body)?;
    let f = Fields::new(&obj, CREATE_FIELDS, "")?;
    let order_id = f.req_str("order_id", 64)?;
    let amount = f.req_amount("amount", currencies)?;
    let payment_method = f.opt_payment_method("payment_method")?.ok_or_else(|| {
        ApiError::invalid(
            "parameter_missing",
            "payment_method is required",
            "payment_method".to_owned(),
        )
    })?;
    let capture_strategy = match f.opt_str("capture_strategy", 16)? {
        None | Some("automatic") => CaptureStrategy::Automatic,
        Some("manual") => CaptureStrategy::Manual,
        Some(_) => {
            return Err(ApiError::param(
                "capture_strategy",
                "capture_strategy must be automatic or manual",
            ))
        }
    };
    let confirm = f.opt_bool("confirm")?.unwrap_or(false);
    let at = now();
    let payment = Payment {
        order_id: order_id.to_owned(),
        capture_strategy,
        customer_id: f.opt_str("customer_id", 64)?.map(str::to_owned),
        description: f.opt_str("description", 1000)?.map(str::to_owned),
        metadata: f.opt_metadata("metadata")?.unwrap_or_default().into(),
        fee_bps: merchant.fee_bps,
        fee_fixed: merchant.fee_fixed,
        customer: f.opt_customer("customer")?.map(Box::new),
        splits: splits(&obj, &f, amount.minor)?.map(Box::new),
        ..Payment::pending(
            PaymentId::generate(),
            merchant.id.clone(),
            amount,
            payment_method.to_owned(),
            psp.to_owned(),
            at,
        )
    };
    Ok((payment, confirm))
}

/// `splits` (`[{ "account": "acct_…", "amount": n }]`, 1 to 100) and `application_fee_amount`,
/// as given: which accounts they name is checked by [`splits_payable`].
fn splits(
    obj: &serde_json::Map<String, serde_json::Value>,
    f: &Fields<'_>,
    amount: i64,
) -> Result<Option<Splits>, ApiError> {
    let fee = f.opt_int("application_fee_amount", 0, crate::domain::MAX_AMOUNT)?;
    let Some(list) = obj.get("splits").filter(|v| !v.is_null()) else {
        return match fee {
            None => Ok(None),
            Some(fee) => Splits::new(amount, fee, Vec::new())
                .map(Some)
                .map_err(|e| ApiError::param("application_fee_amount", e.to_string())),
        };
    };
    let list = list
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::param("splits", "splits must be a list of 1 to 100 objects"))?;
    if list.len() > MAX_SPLITS {
        return Err(ApiError::param("splits", SplitError::TooMany.to_string()));
    }
    let mut parsed = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let prefix = format!("splits[{i}].");
        let o = item
            .as_object()
            .ok_or_else(|| ApiError::param("splits", "each split must be an object"))?;
        let sf = Fields::new(o, &["account", "amount"], &prefix)?;
        let account = AccountId::parse(sf.req_str("account", 80)?)
            .ok_or_else(|| ApiError::param(&format!("{prefix}account"), "account must be an account id (acct_…)"))?;
        let a = sf.opt_int("amount", 1, crate::domain::MAX_AMOUNT)?.ok_or_else(|| {
            ApiError::invalid(
                "parameter_missing",
                format!("{prefix}amount is required"),
                format!("{prefix}amount"),
            )
        })?;
        parsed.push((account, a));
    }
    Splits::new(amount, fee.unwrap_or(0), parsed)
        .map(Some)
        .map_err(|e| ApiError::param("splits", e.to_string()))
}

/// Every account a payment's splits name is the platform's and receives funds.
async fn splits_payable(state: &AppState, merchant: &Merchant, payment: &Payment) -> Result<(), ApiError> {
    let Some(s) = &payment.splits else { return Ok(()) };
    if s.splits.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = s.splits.iter().map(|x| x.account.as_str()).collect();
    let found = state.db.accounts_of(&merchant.id, &ids).await?;
    for (i, x) in s.splits.iter().enumerate() {
        match found.iter().find(|a| a.id == x.account) {
            None => {
                return Err(ApiError::invalid(
                    "resource_missing",
                    "no such account",
                    format!("splits[{i}].account"),
                ))
            }
            Some(a) if !a.receives_funds() => {
                return Err(ApiError::invalid(
                    "account_inactive",
                    "the account does not receive funds (it is restricted or disabled)",
                    format!("splits[{i}].account"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Cluster mode: a new payment's id is drawn again until its partition is one this node owns,
/// so that its actor starts here and creation is never forwarded. Outside cluster mode the id
/// stays as drawn.
fn with_local_id(state: &AppState, mut payment: Payment) -> Result<Payment, ApiError> {
    let Some(leases) = &state.leases else {
        return Ok(payment);
    };
    if leases.owned() > 0 {
        // Owning k of P partitions, a draw lands in one with probability k/P (at least 1/P).
        for _ in 0..(64 * leases.partitions()) {
            if leases.owns(leases.partition_of(payment.id.as_str())) {
                return Ok(payment);
            }
            payment.id = PaymentId::generate();
        }
    }
    Err(ApiError::Unavailable("this node's partitions (it owns none yet)"))
}

/// Has the new payment's actor store it (and, with `confirm`, authorize it): like every other
/// change, creation goes through the actor.
async fn store_new(
    state: &AppState,
    merchant: &Merchant,
    payment: Payment,
    confirm: bool,
    key: crate::actors::IdemKey,
) -> Result<Reply, ApiError> {
    // Checked here, not with the request's form: a retry is answered as the first was.
    splits_payable(state, merchant, &payment).await?;
    let id = payment.id.clone();
    let live = Live {
        payment,
        open: Vec::new(),
    };
    let call = PaymentCall::new(merchant.id.clone(), Op::Create { confirm }, Some(key));
    Ok(state.registry.call_with(&id, Some(live), call).await?)
}

/// `POST /api/v1/payments`
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    // A valid request with a key this node has not seen lately is first tried with its
    // payment's first commit claiming the key; a key held already (or seen lately, or a request
    // that does not parse, or no partition to create it in) goes the ordinary way below.
    let fresh = !state.recent_keys.seen(merchant.id.as_str(), &key);
    if let Some((payment, confirm)) = fresh
        .then(|| new_payment(&state, &merchant, &body).ok())
        .flatten()
        .and_then(|(p, confirm)| Some((with_local_id(&state, p).ok()?, confirm)))
    {
        let id = payment.id.to_string();
        let first = idempotency::run_first(&state, &merchant, &req, &key, &body, &id, |ticket| {
            store_new(&state, &merchant, payment, confirm, ticket.key)
        })
        .await?;
        if let Some(answer) = first {
            return Ok(answer);
        }
    }
    let parsed = new_payment(&state, &merchant, &body);
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(payment, confirm), ticket| async move {
            let (state, merchant) = (st, m);
            if let Some(id) = ticket.resource_id.as_deref().and_then(PaymentId::parse) {
                // An earlier request with this key created the payment and died before answering.
                if confirm {
                    let call = PaymentCall::new(
                        merchant.id.clone(),
                        Op::Confirm {
                            payment_method: None,
                            created: true,
                        },
                        Some(ticket.key),
                    );
                    return Ok(state.registry.call(&id, call).await?);
                }
                let p = state
                    .db
                    .payment_for_merchant(&merchant.id, &id)
                    .await?
                    .ok_or(ApiError::NotFound("payment"))?;
                let body = serde_json::to_vec(&p.object()).map_err(|_| ApiError::Internal)?;
                return Ok(Reply {
                    status: 201,
                    body,
                    stored: false,
                });
            }
            let payment = with_local_id(state, payment)?;
            store_new(state, merchant, payment, confirm, ticket.key).await
        },
    )
    .await
}

/// Runs one operation on an existing payment through its actor, idempotently.
async fn operate(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    parse: impl FnOnce(&AppState, &[u8]) -> Result<Op, ApiError>,
) -> Result<HttpResponse, ApiError> {
    let (merchant, body, key) = idempotency::begin(&state, &req, payload).await?;
    let parsed = path_id(&req).and_then(|id| Ok((id, parse(&state, &body)?)));
    let (st, m) = (&state, &merchant);
    idempotency::run(
        &state,
        &merchant,
        &req,
        key,
        &body,
        parsed,
        |(id, op), ticket| async move {
            let (state, merchant) = (st, m);
            let op = op.resuming(ticket.resource_id.as_deref());
            let call = PaymentCall::new(merchant.id.clone(), op, Some(ticket.key));
            Ok(state.registry.call(&id, call).await?)
        },
    )
    .await
}

/// `POST /api/v1/payments/{id}/confirm`
pub async fn confirm(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    operate(state, req, payload, |_, body| {
        let obj = body::object(body)?;
        let f = Fields::new(&obj, &["payment_method"], "")?;
        Ok(Op::Confirm {
            payment_method: f.opt_payment_method("payment_method")?.map(str::to_owned),
            created: false,
        })
    })
    .await
}

/// `POST /api/v1/payments/{id}/capture`
pub async fn capture(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    operate(state, req, payload, |state, body| {
        let obj = body::object(body)?;
        let f = Fields::new(&obj, &["amount"], "")?;
        Ok(Op::Capture {
            amount: f.opt_amount("amount", &state.currencies)?,
        })
    })
    .await
}

/// `POST /api/v1/payments/{id}/cancel`
pub async fn cancel(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    operate(state, req, payload, |_, body| {
        let obj = body::object(body)?;
        let f = Fields::new(&obj, &["reason"], "")?;
        f.opt_str("reason", 64)?;
        Ok(Op::Cancel)
    })
    .await
}

/// An operation whose body must be `{}`.
async fn bodiless(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    op: Op,
) -> Result<HttpResponse, ApiError> {
    operate(state, req, payload, |_, body| {
        let obj = body::object(body)?;
        Fields::new(&obj, &[], "")?;
        Ok(op)
    })
    .await
}

/// `POST /api/v1/payments/{id}/approve`: a payment held for review goes on.
pub async fn approve(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    bodiless(state, req, payload, Op::Approve).await
}

/// `POST /api/v1/payments/{id}/reject`: a payment held for review is canceled.
pub async fn reject(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    bodiless(state, req, payload, Op::Reject).await
}

/// `POST /api/v1/payments/{id}/refunds`
pub async fn refund(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    operate(state, req, payload, |state, body| {
        let obj = body::object(body)?;
        let f = Fields::new(
            &obj,
            &["amount", "reason", "reverse_splits", "refund_application_fee"],
            "",
        )?;
        let default = RefundShare::default();
        Ok(Op::Refund {
            amount: f.opt_amount("amount", &state.currencies)?,
            reason: f.opt_str("reason", 64)?.map(str::to_owned),
            resume: None,
            share: RefundShare {
                reverse_splits: f.opt_bool("reverse_splits")?.unwrap_or(default.reverse_splits),
                refund_application_fee: f
                    .opt_bool("refund_application_fee")?
                    .unwrap_or(default.refund_application_fee),
            },
        })
    })
    .await
}

/// `GET /api/v1/payments/{id}`
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_id(&req)?;
    let p = state
        .db
        .payment_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    Ok(json_value(200, &p.to_object()))
}

/// An integer query parameter within `min..=max`, or `default` when absent; else a 400.
pub fn int_param(q: &HashMap<String, String>, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| ApiError::param(name, format!("{name} must be {min} to {max}"))),
    }
}

/// The query string as a map; a malformed one is a 400.
pub fn query(req: &HttpRequest) -> Result<HashMap<String, String>, ApiError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|_| ApiError::invalid("parameter_invalid", "the query string could not be parsed", None))
}

pub fn time_param(q: &HashMap<String, String>, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(v) = q.get(name) else { return Ok(None) };
    let t = match v.parse::<i64>() {
        Ok(secs) => DateTime::from_timestamp(secs, 0),
        Err(_) => DateTime::parse_from_rfc3339(v).ok().map(|t| t.with_timezone(&Utc)),
    }
    .ok_or_else(|| ApiError::param(name, format!("{name} must be an RFC 3339 timestamp or Unix seconds")))?;
    // Within what PostgreSQL's timestamptz holds, and what a payment could have: years 1 to 9999.
    let (min, max) = (-62_135_596_800, 253_402_300_799);
    if !(min..=max).contains(&t.timestamp()) {
        return Err(ApiError::param(
            name,
            format!("{name} is out of range (years 1 to 9999)"),
        ));
    }
    Ok(Some(t))
}

/// A time given as `stripe_name` (`created[gte]`, as Stripe and the events API spell it) or as
/// `name` (`created_gte`); both at once is ambiguous and refused.
fn time_param_as(
    q: &HashMap<String, String>,
    stripe_name: &str,
    name: &str,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match (q.contains_key(stripe_name), q.contains_key(name)) {
        (true, true) => Err(ApiError::param(
            stripe_name,
            format!("give {stripe_name} or {name}, not both"),
        )),
        (true, false) => time_param(q, stripe_name),
        _ => time_param(q, name),
    }
}

/// `GET /api/v1/payments`
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let q = query(&req)?;
    let limit = int_param(&q, "limit", 10, 1, 100)?;
    let filter = PaymentFilter {
        limit,
        starting_after: match q.get("starting_after") {
            None => None,
            Some(s) => Some(
                PaymentId::parse(s)
                    .ok_or_else(|| ApiError::param("starting_after", "starting_after must be a payment id"))?,
            ),
        },
        status: match q.get("status") {
            None => None,
            Some(s) => {
                Some(Status::parse(s).ok_or_else(|| ApiError::param("status", "status is not a payment status"))?)
            }
        },
        order_id: match q.get("order_id") {
            Some(o) if o.is_empty() || o.chars().count() > 64 || o.contains('\0') => {
                return Err(ApiError::param("order_id", "order_id must be 1 to 64 characters"))
            }
            other => other.cloned(),
        },
        created_gte: time_param_as(&q, "created[gte]", "created_gte")?,
        created_lt: time_param_as(&q, "created[lt]", "created_lt")?,
    };
    let (payments, has_more) = state.db.list_payments(&merchant.id, &filter).await?;
    Ok(json_value(
        200,
        &list_object(payments.iter().map(Payment::to_object).collect(), has_more),
    ))
}

/// `GET /api/v1/payments/{id}/events`: the audit trail, oldest first.
pub async fn events(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let merchant = auth::merchant(&state, &req).await?;
    let id = path_id(&req)?;
    state
        .db
        .payment_for_merchant(&merchant.id, &id)
        .await?
        .ok_or(ApiError::NotFound("payment"))?;
    let transitions = state.db.payment_transitions(&id).await?;
    Ok(json_value(200, &list_object(transitions, false)))
}
