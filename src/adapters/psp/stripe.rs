//! Stripe, through the PaymentIntents API (docs/API.md, "Connectors"). Every call carries an
//! `Idempotency-Key` derived from the attempt id, so a call repeated after a timeout is the same
//! call to Stripe. An authorization is two calls: the intent is created (key `{attempt}`), then
//! confirmed (key `{attempt}:confirm`), so a decline still names its intent.
//!
//! What Stripe's answers mean for money (`PspError`):
//! - no connection made (refused, no route, DNS), 401/403 (the key is refused) and 429 (rate
//!   limited): Stripe documents these as not processed → `NotSent`;
//! - a 402 card error: the authorization was declined → `Failed`;
//! - other 4xx: Stripe refused the request itself → `Invalid`;
//! - 5xx, a timeout, a lost connection after sending: the outcome is unknown → `Unavailable`.
//!
//! HTTP goes through `super::http` (actix's client, on the payment actor's thread).

use serde_json::Value;

use super::{AuthorizeRequest, Intent, IntentStatus, Psp, PspError, PspFuture, PspRefund, PspRefundStatus};
use crate::domain::{AttemptId, CaptureStrategy, Failure, Money};

pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

pub struct StripePsp {
    connector: String,
    api_key: String,
    api_base: String,
}

impl StripePsp {
    pub fn new(connector: String, api_key: String, api_base: Option<String>) -> StripePsp {
        StripePsp {
            connector,
            api_key,
            api_base: api_base
                .unwrap_or_else(|| DEFAULT_API_BASE.to_owned())
                .trim_end_matches('/')
                .to_owned(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<String>,
        form: &[(&str, String)],
    ) -> Result<Value, Fail> {
        self.call_replayed(method, path, key, form).await.map(|(v, _)| v)
    }

    /// [`StripePsp::call`], and whether Stripe replayed a saved answer for the key.
    async fn call_replayed(
        &self,
        method: &str,
        path: &str,
        key: Option<String>,
        form: &[(&str, String)],
    ) -> Result<(Value, bool), Fail> {
        let url = format!("{}{path}", self.api_base);
        let mut headers = vec![("Authorization", format!("Bearer {}", self.api_key))];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        let req = super::http::request(method, &url, &headers);
        let sent = match method {
            "GET" => req.send().await,
            _ => req.send_form(&form).await,
        };
        let who = format!("stripe connector {}", self.connector);
        let super::http::Answer {
            status,
            body: v,
            replayed,
            ..
        } = super::http::answer(&who, sent).await?;
        match status {
            200..=299 => Ok((v, replayed)),
            401 | 403 | 429 => Err(PspError::NotSent(format!(
                "stripe connector {}: {status} {}",
                self.connector,
                v["error"]["type"].as_str().unwrap_or("")
            ))
            .into()),
            402 => {
                let e = &v["error"];
                Err(Fail::Declined(Failure {
                    code: e["code"].as_str().unwrap_or("card_declined").to_owned(),
                    decline_code: e["decline_code"].as_str().map(str::to_owned),
                    message: e["message"].as_str().unwrap_or("The card was declined.").to_owned(),
                }))
            }
            // The same key is still being worked on at Stripe (a call that timed out here):
            // its outcome is unknown, the attempt stays open.
            409 => {
                Err(PspError::Unavailable(format!("stripe: 409 {}", v["error"]["code"].as_str().unwrap_or(""))).into())
            }
            _ if v["error"]["type"] == "idempotency_error" => Err(Fail::KeyParamsDiffer),
            400..=499 => Err(PspError::Invalid {
                code: v["error"]["code"]
                    .as_str()
                    .unwrap_or("stripe_request_invalid")
                    .to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or("Stripe refused the request")
                    .to_owned(),
                param: v["error"]["param"].as_str().map(str::to_owned),
            }
            .into()),
            500..=599 if replayed => Err(Fail::Saved5xx(status)),
            _ => Err(PspError::Unavailable(format!("stripe: {status}")).into()),
        }
    }

    /// A POST under `key`; if Stripe answers with a 5xx it saved for the key, `done` reads what
    /// Stripe holds now: `Some` is the answer (the request took effect, or something else
    /// decided), `None` means the request did nothing, and it is sent again once under
    /// `{key}:again` (a key of its own: the first one only ever gets the saved error).
    async fn again_unless_done(
        &self,
        path: &str,
        key: &str,
        form: &[(&str, String)],
        done: impl AsyncFnOnce(&Self) -> Result<Option<Value>, Fail>,
    ) -> Result<Value, Fail> {
        match self.call("POST", path, Some(key.to_owned()), form).await {
            Err(Fail::Saved5xx(status)) => {
                tracing::warn!(connector = %self.connector, status, "stripe saved an error for the key; reading what it did");
                match done(self).await? {
                    Some(now) => Ok(now),
                    None => self.call("POST", path, Some(format!("{key}:again")), form).await,
                }
            }
            other => other,
        }
    }

    /// The refund made by `attempt` among the intent's refunds (newest first, a page of 100 at a
    /// time, at most [`REFUND_PAGES`]): `None` only when the whole list was read without it.
    async fn refund_of_attempt(&self, reference: &str, attempt: &str) -> Result<Option<Value>, Fail> {
        let mut after = String::new();
        for _ in 0..REFUND_PAGES {
            let page = self
                .call(
                    "GET",
                    &format!("/v1/refunds?payment_intent={reference}&limit=100{after}"),
                    None,
                    &[],
                )
                .await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if let Some(found) = data.iter().find(|r| r["metadata"]["payrail_attempt_id"] == attempt) {
                return Ok(Some(found.clone()));
            }
            match data.last().and_then(|r| r["id"].as_str()) {
                Some(last) if page["has_more"] == true => after = format!("&starting_after={last}"),
                _ => return Ok(None),
            }
        }
        // Not read to its end: whether it exists is unknown, so nothing is made again.
        Err(PspError::Unavailable("stripe: the intent's refunds are too many to read".into()).into())
    }

    /// The intent as Stripe holds it now, `Some` unless its status is `pending` (what a request
    /// that did nothing leaves).
    async fn intent_unless(&self, reference: &str, pending: &[&str]) -> Result<Option<Value>, Fail> {
        let now = self
            .call("GET", &format!("/v1/payment_intents/{reference}"), None, &[])
            .await?;
        let status = now["status"].as_str().unwrap_or_default();
        Ok((!pending.contains(&status)).then_some(now))
    }

    async fn authorize(&self, req: AuthorizeRequest) -> Result<Intent, PspError> {
        let mut form = vec![
            ("amount", req.amount.minor.to_string()),
            ("currency", req.amount.currency.code().to_ascii_lowercase()),
            ("payment_method", req.payment_method.clone()),
            (
                "capture_method",
                match req.capture {
                    CaptureStrategy::Manual => "manual",
                    CaptureStrategy::Automatic => "automatic",
                }
                .to_owned(),
            ),
            // Cards only: no redirect-based method, so no return_url is needed to confirm.
            ("payment_method_types[]", "card".to_owned()),
            ("metadata[payrail_payment_id]", req.payment_id.to_string()),
            ("metadata[payrail_attempt_id]", req.key.to_string()),
        ];
        if req.three_d_secure {
            form.push(("payment_method_options[card][request_three_d_secure]", "any".to_owned()));
        }
        let created = match self
            .call_replayed("POST", "/v1/payment_intents", Some(req.key.to_string()), &form)
            .await
        {
            // The create ended in an error Stripe keeps for the key. An intent it may have made is
            // unconfirmed (confirming is a call of its own), so it moves no money: create again
            // under a key of its own.
            Err(Fail::Saved5xx(_)) => {
                self.call_replayed("POST", "/v1/payment_intents", Some(format!("{}:again", req.key)), &form)
                    .await
            }
            other => other,
        };
        let (mut created, replayed) = created?;
        let id = created["id"]
            .as_str()
            .filter(|s| s.starts_with("pi_"))
            .ok_or_else(|| PspError::Unavailable("stripe: the created intent has no id".into()))?
            .to_owned();
        if replayed && created["status"] == "requires_confirmation" {
            // A resend: the saved answer shows the intent as it was created. Read it as it is
            // now, so a confirm whose own answer was lost (or saved as an error) is seen done.
            created = self
                .call("GET", &format!("/v1/payment_intents/{id}"), None, &[])
                .await?;
        }
        if created["status"] != "requires_confirmation" {
            // Confirmed already (created with confirmation by an earlier version, or Stripe's
            // saved answer to this key says so).
            return intent(&created, None);
        }
        let confirmed = self
            .again_unless_done(
                &format!("/v1/payment_intents/{id}/confirm"),
                &format!("{}:confirm", req.key),
                &[],
                async |s| s.intent_unless(&id, &["requires_confirmation"]).await,
            )
            .await;
        match confirmed {
            Ok(v) => intent(&v, None),
            // Declined: the intent is known, and the decline is the answer.
            Err(Fail::Declined(f)) => Ok(Intent {
                reference: id,
                client_secret: created["client_secret"].as_str().unwrap_or_default().to_owned(),
                status: IntentStatus::Failed(f),
            }),
            // Not confirmed (`NotSent`): the intent exists unconfirmed, nothing is authorized,
            // and Stripe expires it; another connector may take the payment.
            Err(f @ (Fail::Psp(_) | Fail::Saved5xx(_) | Fail::KeyParamsDiffer)) => Err(f.into()),
        }
    }
}

/// Pages of 100 refunds read to find one whose answer Stripe saved as an error.
const REFUND_PAGES: usize = 10;

/// What a Stripe call can end in besides its answer.
enum Fail {
    /// A 402: the card was declined.
    Declined(Failure),
    /// A 5xx Stripe saved for this idempotency key (`Idempotent-Replayed: true`): the request
    /// ended there with an error, and every resend under the key gets it again. What it did is
    /// to be read from Stripe ([`StripePsp::again_unless_done`]).
    Saved5xx(u16),
    /// `idempotency_error`: the key was used with other parameters (a request sent before this
    /// version, without the metadata it now carries; a key still being worked on is a 409).
    KeyParamsDiffer,
    Psp(PspError),
}

impl From<PspError> for Fail {
    fn from(e: PspError) -> Fail {
        Fail::Psp(e)
    }
}

impl From<Fail> for PspError {
    /// Outside an authorization a decline is a refusal of the request.
    fn from(f: Fail) -> PspError {
        match f {
            Fail::Psp(e) => e,
            Fail::Saved5xx(status) => PspError::Unavailable(format!("stripe: {status}, saved for the key")),
            Fail::KeyParamsDiffer => PspError::Unavailable("stripe: idempotency_error".into()),
            Fail::Declined(d) => PspError::Invalid {
                code: d.code,
                message: d.message,
                param: None,
            },
        }
    }
}

/// Stripe's intent as payrail reads it. `asked` is the amount a capture asked for, when Stripe
/// does not state what it captured.
fn intent(v: &Value, asked: Option<i64>) -> Result<Intent, PspError> {
    let reference = v["id"]
        .as_str()
        .filter(|s| s.starts_with("pi_"))
        .ok_or_else(|| PspError::Unavailable("stripe: an intent without id".into()))?
        .to_owned();
    let amount = v["amount"].as_i64().unwrap_or(0);
    let status = match v["status"].as_str().unwrap_or_default() {
        "requires_capture" => IntentStatus::Authorized {
            amount: v["amount_capturable"].as_i64().filter(|a| *a > 0).unwrap_or(amount),
        },
        "succeeded" => IntentStatus::Succeeded {
            amount_captured: v["amount_received"].as_i64().or(asked).unwrap_or(amount),
        },
        "requires_action" => IntentStatus::RequiresAction {
            redirect_url: v["next_action"]["redirect_to_url"]["url"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        },
        "requires_payment_method" => {
            let e = &v["last_payment_error"];
            IntentStatus::Failed(Failure {
                code: e["code"].as_str().unwrap_or("card_declined").to_owned(),
                decline_code: e["decline_code"].as_str().map(str::to_owned),
                message: e["message"].as_str().unwrap_or("The payment failed.").to_owned(),
            })
        }
        "canceled" => IntentStatus::Canceled,
        // Decided later, by `payment_intent.succeeded` or `payment_failed`.
        "processing" => IntentStatus::Processing,
        other => {
            // `requires_confirmation`: not decided yet; the attempt stays open.
            return Err(PspError::Unavailable(format!("stripe: intent {reference} is {other}")));
        }
    };
    Ok(Intent {
        reference,
        client_secret: v["client_secret"].as_str().unwrap_or_default().to_owned(),
        status,
    })
}

impl Psp for StripePsp {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn authorize(&self, req: AuthorizeRequest) -> PspFuture<'_, Intent> {
        Box::pin(StripePsp::authorize(self, req))
    }

    fn capture(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            let v = self
                .again_unless_done(
                    &format!("/v1/payment_intents/{reference}/capture"),
                    key.as_str(),
                    &[("amount_to_capture", amount.minor.to_string())],
                    async |s| s.intent_unless(&reference, &["requires_capture"]).await,
                )
                .await?;
            intent(&v, Some(amount.minor))
        })
    }

    fn cancel(&self, key: AttemptId, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            let cancelable = [
                "requires_payment_method",
                "requires_capture",
                "requires_confirmation",
                "requires_action",
            ];
            let v = self
                .again_unless_done(
                    &format!("/v1/payment_intents/{reference}/cancel"),
                    key.as_str(),
                    &[],
                    async |s| s.intent_unless(&reference, &cancelable).await,
                )
                .await?;
            intent(&v, None)
        })
    }

    fn refund(&self, key: AttemptId, reference: String, amount: Money) -> PspFuture<'_, PspRefund> {
        Box::pin(async move {
            // The attempt rides along as metadata: how a refund whose answer Stripe saved as an
            // error is found (or known not to exist) among the intent's refunds.
            let form = [
                ("payment_intent", reference.clone()),
                ("amount", amount.minor.to_string()),
                ("metadata[payrail_attempt_id]", key.to_string()),
            ];
            let made = self
                .again_unless_done("/v1/refunds", key.as_str(), &form, async |s| {
                    s.refund_of_attempt(&reference, key.as_str()).await
                })
                .await;
            let v = match made {
                // First sent by a version that gave no metadata: the same request as then.
                Err(Fail::KeyParamsDiffer) => {
                    self.call("POST", "/v1/refunds", Some(key.to_string()), &form[..2])
                        .await?
                }
                other => other?,
            };
            let reference = v["id"]
                .as_str()
                .filter(|s| s.starts_with("re_"))
                .ok_or_else(|| PspError::Unavailable("stripe: a refund without id".into()))?
                .to_owned();
            let status = match v["status"].as_str().unwrap_or_default() {
                "succeeded" => PspRefundStatus::Succeeded,
                "failed" | "canceled" => PspRefundStatus::Failed,
                _ => PspRefundStatus::Pending,
            };
            Ok(PspRefund { reference, status })
        })
    }

    fn retrieve(&self, reference: String) -> PspFuture<'_, Intent> {
        Box::pin(async move {
            let v = self
                .call("GET", &format!("/v1/payment_intents/{reference}"), None, &[])
                .await?;
            intent(&v, None)
        })
    }
}

#[cfg(test)]
mod tests {
    //! Stripe's recorded answers (shapes from Stripe's API reference) served by a local double
    //! that keeps every request payrail sends.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::domain::{Currency, MerchantId, PaymentId};

    /// A request as the double received it: request line, headers (lower-case names), body.
    type Seen = (String, Vec<(String, String)>, String);

    /// Serves `answers` in order, one per request, and records the requests.
    fn double(answers: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end().to_owned();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                    }
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .map(|(_, v)| v.parse().unwrap())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    log.lock()
                        .unwrap()
                        .push((line.trim_end().to_owned(), headers, String::from_utf8(body).unwrap()));
                    let (status, answer) = answers.next().unwrap_or((500, "{}"));
                    // `REPLAY:` marks Stripe's saved answer to a key it already saw.
                    let (extra, answer) = match answer.strip_prefix("REPLAY:") {
                        Some(rest) => ("idempotent-replayed: true\r\n", rest),
                        None => ("", answer),
                    };
                    let out = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    stream.write_all(out.as_bytes()).unwrap();
                }
            }
        });
        (base, seen)
    }

    fn request(key: &str, capture: CaptureStrategy) -> AuthorizeRequest {
        AuthorizeRequest {
            key: AttemptId::from_trusted(key.into()),
            payment_id: PaymentId::from_trusted("pay_1".into()),
            merchant_id: MerchantId::from_trusted("mer_1".into()),
            amount: Money::new(2_000, Currency::parse("EUR").unwrap()),
            payment_method: "pm_1Qcard".into(),
            capture,
            three_d_secure: false,
        }
    }

    const CREATED: &str = r#"{"id":"pi_3Qrec","object":"payment_intent","amount":2000,"currency":"eur",
        "status":"requires_confirmation","client_secret":"pi_3Qrec_secret_x","capture_method":"manual"}"#;
    const AUTHORIZED: &str = r#"{"id":"pi_3Qrec","object":"payment_intent","amount":2000,"amount_capturable":2000,
        "amount_received":0,"currency":"eur","status":"requires_capture","client_secret":"pi_3Qrec_secret_x"}"#;
    const DECLINED: &str = r#"{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds",
        "message":"Your card has insufficient funds.","charge":"ch_3Qrec",
        "payment_intent":{"id":"pi_3Qrec","object":"payment_intent","status":"requires_payment_method"}}}"#;
    const CAPTURED: &str = r#"{"id":"pi_3Qrec","object":"payment_intent","amount":2000,"amount_capturable":0,
        "amount_received":1500,"currency":"eur","status":"succeeded","client_secret":"pi_3Qrec_secret_x"}"#;
    const REFUND_PENDING: &str = r#"{"id":"re_3Qrec","object":"refund","amount":500,"currency":"eur",
        "payment_intent":"pi_3Qrec","status":"pending"}"#;

    fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
        seen.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[actix_rt::test]
    async fn every_call_carries_the_attempt_as_its_idempotency_key_and_amounts_in_minor_units() {
        let (base, seen) = double(vec![
            (200, CREATED),
            (200, AUTHORIZED),
            (200, CAPTURED),
            (200, REFUND_PENDING),
        ]);
        let stripe = StripePsp::new("mca_s".into(), "sk_test_rec".into(), Some(base));
        let i = stripe
            .authorize(request("att_1", CaptureStrategy::Manual))
            .await
            .unwrap();
        assert_eq!(
            (i.reference.as_str(), i.status.clone()),
            ("pi_3Qrec", IntentStatus::Authorized { amount: 2000 })
        );
        let eur = Currency::parse("EUR").unwrap();
        let c = Psp::capture(
            &stripe,
            AttemptId::from_trusted("att_2".into()),
            "pi_3Qrec".into(),
            Money::new(1_500, eur),
        )
        .await
        .unwrap();
        assert_eq!(c.status, IntentStatus::Succeeded { amount_captured: 1500 });
        let r = Psp::refund(
            &stripe,
            AttemptId::from_trusted("att_3".into()),
            "pi_3Qrec".into(),
            Money::new(500, eur),
        )
        .await
        .unwrap();
        assert_eq!((r.reference.as_str(), r.status), ("re_3Qrec", PspRefundStatus::Pending));

        let seen = seen.lock().unwrap().clone();
        let lines: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            lines,
            [
                "POST /v1/payment_intents HTTP/1.1",
                "POST /v1/payment_intents/pi_3Qrec/confirm HTTP/1.1",
                "POST /v1/payment_intents/pi_3Qrec/capture HTTP/1.1",
                "POST /v1/refunds HTTP/1.1"
            ]
        );
        let keys: Vec<Option<&str>> = seen.iter().map(|s| header(s, "idempotency-key")).collect();
        assert_eq!(
            keys,
            [Some("att_1"), Some("att_1:confirm"), Some("att_2"), Some("att_3")]
        );
        assert!(seen
            .iter()
            .all(|s| header(s, "authorization") == Some("Bearer sk_test_rec")));
        assert!(
            seen[0].2.contains("amount=2000") && seen[0].2.contains("currency=eur"),
            "{}",
            seen[0].2
        );
        assert!(seen[0].2.contains("capture_method=manual") && seen[0].2.contains("payment_method=pm_1Qcard"));
        assert!(
            seen[0].2.contains("metadata%5Bpayrail_attempt_id%5D=att_1"),
            "{}",
            seen[0].2
        );
        assert_eq!(seen[2].2, "amount_to_capture=1500");
        assert_eq!(
            seen[3].2,
            "payment_intent=pi_3Qrec&amount=500&metadata%5Bpayrail_attempt_id%5D=att_3"
        );
    }

    /// A resend after a confirm whose answer was lost: Stripe replays the create's saved answer
    /// (the intent unconfirmed), so payrail reads the intent as it is now before confirming
    /// anything, and finds it authorized: no second confirm.
    #[actix_rt::test]
    async fn a_resend_reads_the_intent_before_confirming_it_again() {
        let replayed: &'static str = Box::leak(format!("REPLAY:{CREATED}").into_boxed_str());
        let (base, seen) = double(vec![(200, replayed), (200, AUTHORIZED)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let i = stripe
            .authorize(request("att_r", CaptureStrategy::Manual))
            .await
            .unwrap();
        assert_eq!(i.status, IntentStatus::Authorized { amount: 2000 });
        let lines: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(
            lines,
            [
                "POST /v1/payment_intents HTTP/1.1",
                "GET /v1/payment_intents/pi_3Qrec HTTP/1.1"
            ]
        );
    }

    /// Stripe's saved 500 for a key: every resend under it gets this again.
    const SAVED_500: &str = r#"REPLAY:{"error":{"type":"api_error","message":"An unknown error occurred"}}"#;

    fn lines_and_keys(seen: &Arc<Mutex<Vec<Seen>>>) -> Vec<(String, Option<String>)> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|s| (s.0.clone(), header(s, "idempotency-key").map(str::to_owned)))
            .collect()
    }

    #[actix_rt::test]
    async fn a_capture_stripe_saved_as_an_error_is_read_and_made_under_a_key_of_its_own() {
        let eur = |m| Money::new(m, Currency::parse("EUR").unwrap());
        // Nothing was captured (the intent still waits for it): asked again under `:again`.
        let (base, seen) = double(vec![(500, SAVED_500), (200, AUTHORIZED), (200, CAPTURED)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let key = AttemptId::from_trusted("att_c".into());
        let i = stripe
            .capture(key.clone(), "pi_3Qrec".into(), eur(1_500))
            .await
            .unwrap();
        assert_eq!(i.status, IntentStatus::Succeeded { amount_captured: 1500 });
        let sent = lines_and_keys(&seen);
        assert_eq!(sent[1].0, "GET /v1/payment_intents/pi_3Qrec HTTP/1.1");
        assert_eq!(sent[2].1.as_deref(), Some("att_c:again"));
        // It was captured after all: that is the answer, nothing is sent again.
        let (base, seen) = double(vec![(500, SAVED_500), (200, CAPTURED)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let i = stripe.capture(key, "pi_3Qrec".into(), eur(1_500)).await.unwrap();
        assert_eq!(i.status, IntentStatus::Succeeded { amount_captured: 1500 });
        assert_eq!(lines_and_keys(&seen).len(), 2);
    }

    #[actix_rt::test]
    async fn a_refund_stripe_saved_as_an_error_is_found_by_its_attempt_or_made_again() {
        let eur = |m| Money::new(m, Currency::parse("EUR").unwrap());
        let key = AttemptId::from_trusted("att_f".into());
        // It exists (found among the intent's refunds by its attempt): never made twice.
        let listed = r#"{"object":"list","data":[{"id":"re_other","status":"succeeded","metadata":{}},
            {"id":"re_3Qmine","status":"succeeded","metadata":{"payrail_attempt_id":"att_f"}}]}"#;
        let (base, seen) = double(vec![(500, SAVED_500), (200, listed)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let r = stripe.refund(key.clone(), "pi_3Qrec".into(), eur(500)).await.unwrap();
        assert_eq!(
            (r.reference.as_str(), r.status),
            ("re_3Qmine", PspRefundStatus::Succeeded)
        );
        let sent = lines_and_keys(&seen);
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].0, "GET /v1/refunds?payment_intent=pi_3Qrec&limit=100 HTTP/1.1");
        assert!(seen.lock().unwrap()[0]
            .2
            .contains("metadata%5Bpayrail_attempt_id%5D=att_f"));
        // It does not: made once more, under a key of its own.
        let (base, seen) = double(vec![
            (500, SAVED_500),
            (200, r#"{"object":"list","data":[]}"#),
            (200, REFUND_PENDING),
        ]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let r = stripe.refund(key, "pi_3Qrec".into(), eur(500)).await.unwrap();
        assert_eq!(r.reference, "re_3Qrec");
        assert_eq!(lines_and_keys(&seen)[2].1.as_deref(), Some("att_f:again"));
    }

    #[actix_rt::test]
    async fn a_refund_first_sent_without_metadata_is_asked_again_as_it_was_then() {
        let eur = |m| Money::new(m, Currency::parse("EUR").unwrap());
        let differ = r#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters they were first used with."}}"#;
        let (base, seen) = double(vec![(400, differ), (200, REFUND_PENDING)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let r = stripe
            .refund(AttemptId::from_trusted("att_o".into()), "pi_3Qrec".into(), eur(500))
            .await
            .unwrap();
        assert_eq!(r.reference, "re_3Qrec");
        let seen = seen.lock().unwrap();
        assert_eq!(header(&seen[1], "idempotency-key"), Some("att_o"));
        assert_eq!(seen[1].2, "payment_intent=pi_3Qrec&amount=500");
    }

    #[actix_rt::test]
    async fn a_create_stripe_saved_as_an_error_is_made_again_under_a_key_of_its_own() {
        let (base, seen) = double(vec![(500, SAVED_500), (200, CREATED), (200, AUTHORIZED)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let i = stripe
            .authorize(request("att_n", CaptureStrategy::Manual))
            .await
            .unwrap();
        assert_eq!(i.status, IntentStatus::Authorized { amount: 2000 });
        let sent = lines_and_keys(&seen);
        assert_eq!(sent[1].1.as_deref(), Some("att_n:again"));
        assert_eq!(sent[2].1.as_deref(), Some("att_n:confirm"));
    }

    #[actix_rt::test]
    async fn a_decline_names_its_intent_and_keeps_stripes_decline_code() {
        let (base, _) = double(vec![(200, CREATED), (402, DECLINED)]);
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
        let i = stripe
            .authorize(request("att_d", CaptureStrategy::Automatic))
            .await
            .unwrap();
        assert_eq!(i.reference, "pi_3Qrec");
        assert_eq!(
            i.status,
            IntentStatus::Failed(Failure {
                code: "card_declined".into(),
                decline_code: Some("insufficient_funds".into()),
                message: "Your card has insufficient funds.".into(),
            })
        );
    }

    #[actix_rt::test]
    async fn only_what_stripe_documents_as_not_processed_counts_as_not_sent() {
        type Case = (u16, &'static str, fn(&PspError) -> bool);
        let cases: [Case; 6] = [
            (
                409,
                r#"{"error":{"type":"idempotency_error","code":"idempotency_key_in_use"}}"#,
                |e| matches!(e, PspError::Unavailable(_)),
            ),
            (429, r#"{"error":{"type":"rate_limit_error"}}"#, |e| {
                matches!(e, PspError::NotSent(_))
            }),
            (401, r#"{"error":{"type":"authentication_error"}}"#, |e| {
                matches!(e, PspError::NotSent(_))
            }),
            (500, r#"{"error":{"type":"api_error"}}"#, |e| {
                matches!(e, PspError::Unavailable(_))
            }),
            (503, "", |e| matches!(e, PspError::Unavailable(_))),
            (
                400,
                r#"{"error":{"type":"invalid_request_error","code":"parameter_invalid_integer","param":"amount","message":"Invalid integer"}}"#,
                |e| matches!(e, PspError::Invalid { code, param, .. } if code == "parameter_invalid_integer" && param.as_deref() == Some("amount")),
            ),
        ];
        for (status, body, want) in cases {
            let (base, _) = double(vec![(status, body)]);
            let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(base));
            let e = stripe
                .authorize(request("att_x", CaptureStrategy::Automatic))
                .await
                .unwrap_err();
            assert!(want(&e), "{status}: {e:?}");
        }
        // Nothing listens: the connection is refused before anything is sent.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let stripe = StripePsp::new("mca_s".into(), "sk".into(), Some(format!("http://127.0.0.1:{port}")));
        let e = stripe
            .authorize(request("att_y", CaptureStrategy::Automatic))
            .await
            .unwrap_err();
        assert!(matches!(e, PspError::NotSent(_)), "{e:?}");
    }

    #[test]
    fn stripes_intent_statuses_read_as_payrails() {
        let read = |s: &str| intent(&serde_json::from_str(s).unwrap(), None);
        let action = read(
            r#"{"id":"pi_1","amount":100,"status":"requires_action",
                "next_action":{"type":"redirect_to_url","redirect_to_url":{"url":"https://hooks.stripe.com/3d_secure_2/x"}}}"#,
        )
        .unwrap();
        assert_eq!(
            action.status,
            IntentStatus::RequiresAction {
                redirect_url: "https://hooks.stripe.com/3d_secure_2/x".into()
            }
        );
        assert_eq!(
            read(r#"{"id":"pi_1","amount":100,"status":"canceled"}"#)
                .unwrap()
                .status,
            IntentStatus::Canceled
        );
        assert_eq!(
            read(r#"{"id":"pi_1","amount":100,"amount_received":100,"status":"succeeded"}"#)
                .unwrap()
                .status,
            IntentStatus::Succeeded { amount_captured: 100 }
        );
        assert_eq!(
            read(r#"{"id":"pi_1","amount":100,"status":"processing"}"#)
                .unwrap()
                .status,
            IntentStatus::Processing
        );
        assert!(matches!(
            read(r#"{"id":"pi_1","amount":100,"status":"requires_confirmation"}"#),
            Err(PspError::Unavailable(_))
        ));
        let failed = read(
            r#"{"id":"pi_1","amount":100,"status":"requires_payment_method",
                "last_payment_error":{"code":"card_declined","decline_code":"do_not_honor","message":"Declined."}}"#,
        )
        .unwrap();
        assert!(matches!(failed.status, IntentStatus::Failed(f) if f.decline_code.as_deref() == Some("do_not_honor")));
    }
}
