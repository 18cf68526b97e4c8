//! Adyen, through the Checkout API v71 (docs/API.md, "Adyen connectors"): `/payments`, then
//! `/payments/{pspReference}/captures|cancels|refunds`. Every call carries `Idempotency-Key` =
//! the attempt id and `X-API-Key`; amounts are minor units (`{"currency","value"}`).
//!
//! Adyen is asynchronous after the authorization: a capture, a cancel or a refund is only
//! *received* (`"status": "received"`), and its outcome comes by notification (CAPTURE,
//! CAPTURE_FAILED, CANCELLATION, REFUND, REFUND_FAILED). So a received capture leaves the payment
//! `capturing` and a received refund `pending`; a received cancel is taken as done (it moves no
//! money; a failed CANCELLATION is recorded for an operator).
//!
//! What Adyen's answers mean for money: no connection made, 401, 403 and 429 are not processed
//! → `NotSent`; 400, 404 and 422 (validation) are refusals → `Invalid`; 5xx, a timeout, a lost
//! answer → unknown, the attempt stays open.

use serde_json::{json, Value};

use super::{AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspFuture, PspRefund, PspRefundStatus};
use crate::domain::{AttemptId, CaptureStrategy, Failure, Money};

pub const DEFAULT_API_BASE: &str = "https://checkout-test.adyen.com/v71";

pub struct AdyenPsp {
    connector: String,
    api_key: String,
    merchant_account: String,
    api_base: String,
}

impl AdyenPsp {
    pub fn new(connector: String, api_key: String, merchant_account: String, api_base: Option<String>) -> AdyenPsp {
        AdyenPsp {
            connector,
            api_key,
            merchant_account,
            api_base: api_base
                .unwrap_or_else(|| DEFAULT_API_BASE.to_owned())
                .trim_end_matches('/')
                .to_owned(),
        }
    }

    async fn call(&self, path: &str, key: &AttemptId, body: Value) -> Result<Value, PspError> {
        let url = format!("{}{path}", self.api_base);
        let headers = [
            ("X-API-Key", self.api_key.clone()),
            ("Idempotency-Key", key.to_string()),
        ];
        let sent = super::http::request("POST", &url, &headers).send_json(&body).await;
        let who = format!("adyen connector {}", self.connector);
        let super::http::Answer {
            status,
            body: v,
            transient,
            ..
        } = super::http::answer(&who, sent).await?;
        match status {
            200..=299 => Ok(v),
            401 | 403 | 429 => Err(PspError::NotSent(format!(
                "{who}: {status} {}",
                v["errorType"].as_str().unwrap_or("")
            ))),
            // "Request already processed or in progress" (errorCode 704), or any other answer
            // Adyen marks transient: a request under this key may be under way there and may
            // still succeed. Never a refusal: the attempt stays open, sent again with the key.
            _ if transient || v["errorCode"] == "704" => Err(PspError::Unavailable(format!(
                "{who}: {status} {} (in progress; sent again later)",
                v["errorCode"].as_str().unwrap_or("transient")
            ))),
            400 | 404 | 422 => Err(PspError::Invalid {
                code: v["errorCode"]
                    .as_str()
                    .map(|c| format!("adyen_{c}"))
                    .unwrap_or_else(|| "adyen_request_invalid".into()),
                message: v["message"].as_str().unwrap_or("Adyen refused the request").to_owned(),
                param: None,
            }),
            _ => Err(PspError::Unavailable(format!("{who}: {status}"))),
        }
    }

    fn amount(m: Money) -> Value {
        json!({ "currency": m.currency.code(), "value": m.minor })
    }

    async fn authorize(&self, req: AuthorizeRequest) -> Result<Intent, PspError> {
        let mut body = json!({
            "merchantAccount": self.merchant_account,
            "amount": Self::amount(req.amount),
            "reference": req.payment_id.as_str(),
            // The merchant's stored card at Adyen (payrail never sees a card).
            // payrail's payment methods are `pm_…` tokens: an Adyen stored card is `pm_` and its
            // `storedPaymentMethodId` (Adyen's own ids have no such prefix).
            "paymentMethod": { "type": "scheme",
                               "storedPaymentMethodId": req.payment_method.strip_prefix("pm_").unwrap_or(&req.payment_method) },
            "shopperInteraction": "ContAuth",
            "recurringProcessingModel": "CardOnFile",
            "metadata": { "payrail_attempt_id": req.key.as_str() },
        });
        match req.capture {
            CaptureStrategy::Manual => body["additionalData"] = json!({ "manualCapture": "true" }),
            CaptureStrategy::Automatic => body["captureDelayHours"] = json!(0),
        }
        if req.three_d_secure {
            body["authenticationData"] = json!({ "attemptAuthentication": "always" });
        }
        let v = self.call("/payments", &req.key, body).await?;
        let reference = v["pspReference"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| PspError::Unavailable("adyen: an answer without pspReference".into()))?
            .to_owned();
        let status = match v["resultCode"].as_str().unwrap_or_default() {
            // Captured at once when the capture delay is 0.
            "Authorised" => match req.capture {
                CaptureStrategy::Manual => IntentStatus::Authorized {
                    amount: req.amount.minor,
                },
                CaptureStrategy::Automatic => IntentStatus::Succeeded {
                    amount_captured: req.amount.minor,
                },
            },
            "Refused" | "Error" => IntentStatus::Failed(Failure {
                code: "card_declined".into(),
                decline_code: v["refusalReason"].as_str().map(decline_code),
                message: v["refusalReason"].as_str().unwrap_or("Refused").to_owned(),
            }),
            "Cancelled" => IntentStatus::Canceled,
            "RedirectShopper" | "IdentifyShopper" | "ChallengeShopper" => IntentStatus::RequiresAction {
                redirect_url: v["action"]["url"].as_str().unwrap_or_default().to_owned(),
            },
            // Decided later, by AUTHORISATION (the reference is kept, so it finds the payment).
            "Pending" | "Received" => IntentStatus::Processing,
            other => return Err(PspError::Unavailable(format!("adyen: {reference} is {other}"))),
        };
        Ok(Intent {
            reference,
            client_secret: String::new(),
            status,
        })
    }

    /// A modification (capture, cancel, refund) of `reference`: Adyen's 201 with `received`.
    async fn modify(
        &self,
        what: &str,
        key: &AttemptId,
        reference: &str,
        amount: Option<Money>,
    ) -> Result<String, PspError> {
        let mut body = json!({ "merchantAccount": self.merchant_account, "reference": key.as_str() });
        if let Some(m) = amount {
            body["amount"] = Self::amount(m);
        }
        let v = self.call(&format!("/payments/{reference}/{what}"), key, body).await?;
        if v["status"] != "received" {
            return Err(PspError::Unavailable(format!("adyen: {what} answered {}", v["status"])));
        }
        v["pspReference"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| PspError::Unavailable(format!("adyen: a {what} answer without pspReference")))
    }
}

/// Adyen's refusal reason as a decline code (`Not enough balance` → `not_enough_balance`).
pub fn decline_code(reason: &str) -> String {
    reason
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl Psp for AdyenPsp {
    fn name(&self) -> &'static str {
        "adyen"
    }

    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent> {
        Box::pin(AdyenPsp::authorize(self, req))
    }

    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.modify("captures", &key, &reference, Some(amount)).await?;
            Ok(Intent {
                reference,
                client_secret: String::new(),
                status: IntentStatus::CaptureReceived { amount: amount.minor },
            })
        })
    }

    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            self.modify("cancels", &key, &reference, None).await?;
            Ok(Intent {
                reference,
                client_secret: String::new(),
                status: IntentStatus::Canceled,
            })
        })
    }

    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund> {
        Box::pin(async move {
            let reference = self.modify("refunds", &key, &reference, Some(amount)).await?;
            Ok(PspRefund {
                reference,
                status: PspRefundStatus::Pending,
            })
        })
    }

    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent> {
        // Checkout has no read of a payment: its outcome comes by notification.
        Box::pin(async move {
            Err(PspError::Unavailable(format!(
                "adyen: {reference} cannot be read back; its notification decides"
            )))
        })
    }
}
