//! The one error type the API answers with. Each variant knows its HTTP status, its error
//! `type` and `code` (docs/API.md, "Errors"). Messages never carry request values, so a card number
//! sent by mistake cannot come back in an error.

use actix_web::http::StatusCode;
use serde_json::json;

use crate::domain::payment::{Rejection, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        code: &'static str,
        message: String,
        param: Option<String>,
    },
    #[error("invalid or missing API key")]
    Authentication,
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("this operation is not allowed while the payment is {}", .0.as_str())]
    InvalidState(Status),
    #[error("the amount is more than what is left")]
    AmountTooLarge { param: &'static str },
    #[error("the Idempotency-Key header is required: 1 to 255 printable ASCII characters")]
    IdempotencyKeyMissing,
    #[error("a request with this Idempotency-Key is still in flight")]
    IdempotencyKeyInUse,
    /// A create's first commit was to claim its key, and another request holds the key: the
    /// API then claims it the ordinary way (`api::idempotency::run_first`). Should it reach a
    /// client, it reads as `idempotency_key_in_use`.
    #[error("a request with this Idempotency-Key is still in flight")]
    IdempotencyKeyHeld,
    #[error("this Idempotency-Key was used with another method, path or body")]
    IdempotencyKeyReused,
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("too many requests")]
    RateLimited,
    /// This client's keys failed too often of late: no look-up for it until the minute is
    /// over (`[ratelimit] failed_keys_per_minute`); the seconds left.
    #[error("too many requests with keys that are not valid; retry later")]
    KeysFailing(u64),
    #[error("{0} is unavailable; retry later")]
    Unavailable(&'static str),
    /// The request collides with work under way on the same object (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: &'static str },
    #[error("internal error")]
    Internal,
    /// A forwarded call's owner did not answer in time (cluster mode): the request may still
    /// complete there; its Idempotency-Key stays in flight until its lease passes.
    #[error("the payment's node did not answer in time; retry with the same Idempotency-Key")]
    OutcomeUnknown,
    /// Cluster mode: the answer of the node that owns the payment, passed on as it came.
    #[error("the payment's node answered {status}")]
    Remote {
        status: u16,
        body: Vec<u8>,
        replayable: bool,
    },
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>, param: impl Into<Option<String>>) -> ApiError {
        ApiError::InvalidRequest {
            code,
            message: message.into(),
            param: param.into(),
        }
    }

    /// A parameter problem: `code` is `parameter_invalid` or a more specific one.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid("parameter_invalid", message, Some(param.to_owned()))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::AmountTooLarge { .. } | ApiError::IdempotencyKeyMissing => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Authentication => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::InvalidState(_)
            | ApiError::IdempotencyKeyInUse
            | ApiError::IdempotencyKeyHeld
            | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited | ApiError::KeysFailing(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::OutcomeUnknown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Remote { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Authentication => "authentication_error",
            ApiError::IdempotencyKeyInUse | ApiError::IdempotencyKeyHeld | ApiError::IdempotencyKeyReused => {
                "idempotency_error"
            }
            ApiError::RateLimited | ApiError::KeysFailing(_) => "rate_limit_error",
            ApiError::Unavailable(_) | ApiError::Internal | ApiError::Remote { .. } | ApiError::OutcomeUnknown => {
                "api_error"
            }
            _ => "invalid_request_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } => code,
            ApiError::Authentication => "api_key_invalid",
            ApiError::NotFound(_) => "resource_missing",
            ApiError::InvalidState(_) => "payment_invalid_state",
            ApiError::AmountTooLarge { .. } => "amount_too_large",
            ApiError::IdempotencyKeyMissing => "idempotency_key_missing",
            ApiError::IdempotencyKeyInUse | ApiError::IdempotencyKeyHeld => "idempotency_key_in_use",
            ApiError::Conflict { code, .. } => code,
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::RateLimited => "rate_limited",
            ApiError::KeysFailing(_) => "too_many_failed_keys",
            ApiError::Unavailable(_) | ApiError::OutcomeUnknown => "dependency_unavailable",
            ApiError::Internal => "internal_error",
            ApiError::Remote { .. } => "remote",
        }
    }

    fn param_name(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::AmountTooLarge { param } => Some(param),
            ApiError::IdempotencyKeyMissing => Some("Idempotency-Key"),
            _ => None,
        }
    }

    /// The response body, exactly as docs/API.md shapes it.
    pub fn body(&self) -> Vec<u8> {
        if let ApiError::Remote { body, .. } = self {
            return body.clone();
        }
        let mut error = json!({ "type": self.error_type(), "code": self.code(), "message": self.to_string() });
        if let Some(p) = self.param_name() {
            error["param"] = json!(p);
        }
        serde_json::to_vec(&json!({ "error": error })).unwrap_or_default()
    }

    /// Whether an idempotent request that ended in this error stores it for replay: only the
    /// answers the operation itself produced (docs/API.md, "Idempotency").
    pub fn is_replayable(&self) -> bool {
        if let ApiError::Remote { replayable, .. } = self {
            return *replayable;
        }
        !matches!(
            self,
            ApiError::Authentication
                | ApiError::IdempotencyKeyInUse
                | ApiError::IdempotencyKeyHeld
                | ApiError::IdempotencyKeyReused
                | ApiError::IdempotencyKeyMissing
                | ApiError::RateLimited
                | ApiError::KeysFailing(_)
                | ApiError::BodyTooLarge(_)
        ) && self.status().as_u16() < 500
    }

    /// A state-machine rejection in the words of the API; `param` names the amount field.
    pub fn from_rejection(r: Rejection, param: &'static str) -> ApiError {
        match r {
            Rejection::InvalidState(s) => ApiError::InvalidState(s),
            Rejection::AmountTooLarge => ApiError::AmountTooLarge { param },
            Rejection::AmountNotPositive => ApiError::param(param, "amount must be a positive integer"),
        }
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> actix_web::HttpResponse {
        let mut resp = actix_web::HttpResponse::build(self.status());
        resp.content_type("application/json");
        if let ApiError::KeysFailing(secs) = self {
            resp.insert_header(("Retry-After", secs.to_string()));
        } else if matches!(self, ApiError::Unavailable(_) | ApiError::RateLimited) || self.status().as_u16() == 503 {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.body(self.body())
    }
}

/// PostgreSQL down is a 503 (fail closed, retry); anything else the store refused is a bug.
impl From<crate::adapters::postgres::StoreError> for ApiError {
    fn from(e: crate::adapters::postgres::StoreError) -> ApiError {
        match e {
            crate::adapters::postgres::StoreError::Unavailable => ApiError::Unavailable("database"),
            crate::adapters::postgres::StoreError::Broken => ApiError::Internal,
        }
    }
}

/// A payment actor's outcome, as HTTP.
impl From<crate::actors::PaymentError> for ApiError {
    fn from(e: crate::actors::PaymentError) -> ApiError {
        use crate::actors::PaymentError as P;
        match e {
            P::Rejected { rejection, param } => ApiError::from_rejection(rejection, param),
            P::InvalidParam { param, message } => ApiError::param(param, message),
            P::NotFound(what) => ApiError::NotFound(what),
            P::PspRefused { code, message, param } => ApiError::InvalidRequest { code, message, param },
            P::KeyTakenOver => ApiError::IdempotencyKeyInUse,
            P::KeyHeld => ApiError::IdempotencyKeyHeld,
            P::Unavailable(what) => ApiError::Unavailable(what),
            P::Store(s) => s.into(),
            P::OutcomeUnknown => ApiError::OutcomeUnknown,
            P::Remote {
                status,
                body,
                replayable,
            } => ApiError::Remote {
                status,
                body,
                replayable,
            },
        }
    }
}
