//! The Adyen connector against a local double of the Checkout API v71 that answers with Adyen's
//! documented examples and keeps every request payrail sends, then checks each: the path, the
//! `X-API-Key`, the `Idempotency-Key` (the attempt id), the merchant account and the amounts in
//! minor units. Adyen's notifications (signed with the connector's `hmac_key`) then decide what
//! Adyen only *received*: captures, refunds, and chargebacks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::events::wait_for;
use crate::helpers::{spawn_app_with, TestApp};

const KEY: &str = "5b4a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c";
const HMAC_KEY: &str = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056";
const API_KEY: &str = "AQE_test_api_key_for_the_double";
const ACCOUNT: &str = "PayrailECOM";

/// A request as the double got it: method and path, headers (lower-case names), JSON body.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Adyen's answers, chosen by path and by what the request asks for.
fn answer(path: &str, body: &Value, n: usize) -> (u16, Value) {
    let amount = body["amount"].clone();
    if path == "/v71/payments" {
        let psp = format!("PSP{:013}", n);
        // Adyen's own stored-card ids: payrail's `pm_` prefix does not reach Adyen.
        assert!(
            !body["paymentMethod"]["storedPaymentMethodId"]
                .as_str()
                .unwrap_or_default()
                .starts_with("pm_"),
            "{body}"
        );
        return match body["paymentMethod"]["storedPaymentMethodId"].as_str() {
            Some("stored_refused") => (
                200,
                json!({ "pspReference": psp, "resultCode": "Refused", "refusalReason": "Not enough balance",
                        "refusalReasonCode": "12", "merchantReference": body["reference"] }),
            ),
            Some(m) if m.starts_with("stored_pending") => (
                200,
                json!({ "pspReference": psp, "resultCode": "Pending", "merchantReference": body["reference"] }),
            ),
            // Adyen still works on an earlier send under this key.
            Some("stored_in_progress") => (
                422,
                json!({ "status": 422, "errorCode": "704", "message": "request already processed or in progress",
                        "errorType": "validation" }),
            ),
            Some("stored_bad") => (
                422,
                json!({ "status": 422, "errorCode": "14_0417", "message": "The stored payment method is not found",
                        "errorType": "validation" }),
            ),
            _ => (
                200,
                json!({ "pspReference": psp, "resultCode": "Authorised", "amount": amount,
                        "merchantReference": body["reference"],
                        "additionalData": { "authCode": "054315" } }),
            ),
        };
    }
    // /v71/payments/{psp}/captures|cancels|refunds
    let parts: Vec<&str> = path.trim_start_matches("/v71/payments/").split('/').collect();
    let (payment, what) = (parts[0], parts.get(1).copied().unwrap_or(""));
    let prefix = match what {
        "captures" => "CAP",
        "refunds" => "REF",
        _ => "CAN",
    };
    let mut a = json!({ "merchantAccount": body["merchantAccount"], "paymentPspReference": payment,
                        "pspReference": format!("{prefix}{:013}", n), "reference": body["reference"],
                        "status": "received" });
    if !amount.is_null() {
        a["amount"] = amount;
    }
    (201, a)
}

fn double() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v71", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
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
                    let mut raw = vec![0; len];
                    reader.read_exact(&mut raw).unwrap();
                    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                    let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let (status, out) = {
                        let mut log = log.lock().unwrap();
                        log.push(Seen {
                            line: line.trim_end().to_owned(),
                            headers,
                            body: body.clone(),
                        });
                        answer(&path, &body, log.len())
                    };
                    let out = out.to_string();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
                        out.len()
                    );
                    stream.write_all(resp.as_bytes()).unwrap();
                }
            });
        }
    });
    (base, seen)
}

async fn setup() -> (TestApp, Arc<Mutex<Vec<Seen>>>) {
    let (base, seen) = double();
    let app = spawn_app_with(|c| c.secrets.key = KEY.into()).await;
    let conns = app.get("/api/v1/connectors").await;
    let merchant = conns.body["data"][0]["merchant_id"].as_str().unwrap().to_owned();
    let token = app.state.config.admin.token.clone();
    let body = json!({ "connector_id": "mca_adyen_double", "psp": "adyen", "label": "Adyen (double)",
                       "currencies": ["EUR"],
                       "credentials": { "api_key": API_KEY, "merchant_account": ACCOUNT, "hmac_key": HMAC_KEY,
                                        "api_base": base } });
    let r = app
        .request(
            "POST",
            &format!("/admin/v1/merchants/{merchant}/connectors"),
            Some(&token),
            None,
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rules =
        json!({ "rules": [{ "name": "eur", "when": { "currency": ["EUR"] }, "connector": "mca_adyen_double" }] });
    let r = app
        .request(
            "PUT",
            &format!("/admin/v1/merchants/{merchant}/routing"),
            Some(&token),
            None,
            Some(&rules.to_string()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    (app, seen)
}

async fn pay(app: &TestApp, amount: i64, method: &str, capture: &str) -> Value {
    let r = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "ord_adyen", "amount": { "value": amount, "currency": "EUR" },
                    "payment_method": method, "capture_strategy": capture, "confirm": true }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

/// An Adyen notification of one item, signed with the connector's HMAC key, to its URL.
async fn notify(app: &TestApp, code: &str, success: bool, psp: &str, original: &str, amount: i64, reason: &str) {
    notify_item(app, code, success, psp, original, Some(amount), reason).await;
}

/// A notification item as Adyen signs it; `amount` `None` leaves its value out.
async fn notify_item(
    app: &TestApp,
    code: &str,
    success: bool,
    psp: &str,
    original: &str,
    amount: Option<i64>,
    reason: &str,
) {
    let value = amount.map(|a| a.to_string()).unwrap_or_default();
    let success = if success { "true" } else { "false" };
    let fields = payrail::adapters::psp::signature::AdyenFields {
        psp_reference: psp,
        original_reference: original,
        merchant_account_code: ACCOUNT,
        merchant_reference: "ref",
        value: &value,
        currency: "EUR",
        event_code: code,
        success,
    };
    let signature = payrail::adapters::psp::signature::sign_adyen(&fields, HMAC_KEY).unwrap();
    let body = json!({ "live": "false", "notificationItems": [ { "NotificationRequestItem": {
        "additionalData": { "hmacSignature": signature },
        "amount": { "currency": "EUR", "value": amount.map_or(Value::Null, |a| json!(a)) },
        "eventCode": code, "eventDate": "2026-11-27T12:00:00+01:00", "merchantAccountCode": ACCOUNT,
        "merchantReference": "ref", "originalReference": original, "pspReference": psp,
        "reason": reason, "success": success } } ] });
    let mut r = app
        .client
        .post(format!("{}/internal/webhooks/psp/adyen/mca_adyen_double", app.address))
        .insert_header(("Content-Type", "application/json"))
        .send_body(body.to_string())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.body().await);
    assert_eq!(r.body().await.unwrap(), "[accepted]");
}

/// The pspReference the double gave the last request to `path` (it numbers them in order).
fn last_modification(seen: &Arc<Mutex<Vec<Seen>>>, path: &str, prefix: &str) -> String {
    let i = seen
        .lock()
        .unwrap()
        .iter()
        .rposition(|s| s.line.contains(path))
        .unwrap();
    format!("{prefix}{:013}", i + 1)
}

async fn status_is(app: &TestApp, id: &str, want: &str) {
    wait_for(&format!("{id} to be {want}"), async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == want
    })
    .await;
}

#[actix_web::test]
async fn an_adyen_payment_is_decided_by_its_notifications() {
    let (app, seen) = setup().await;

    // Authorised (manual capture), then a partial capture Adyen only receives.
    let p = pay(&app, 2_000, "pm_stored_card_1", "manual").await;
    assert_eq!(
        (p["status"].as_str(), p["psp"].as_str()),
        (Some("authorized"), Some("adyen")),
        "{p}"
    );
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let psp = p["psp_reference"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/capture"),
            json!({ "amount": { "value": 1_500, "currency": "EUR" } }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str(), r.body["amount_captured"].as_i64()),
        (200, Some("capturing"), Some(0)),
        "{}",
        r.body
    );
    // Nothing else until Adyen decides.
    let again = app.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(again.status, 409, "{}", again.body);
    let cancel = app.post(&format!("/api/v1/payments/{id}/cancel"), json!({})).await;
    assert_eq!(cancel.status, 409, "{}", cancel.body);
    assert_eq!(app.count("journals").await, 0, "nothing posted before Adyen confirms");
    let capture_ref = last_modification(&seen, "/captures", "CAP");
    // A success that names no amount decides nothing: the capture may be of part.
    let exceptions = async |payment: &str| -> i64 {
        app.sql()
            .await
            .query_one(
                "SELECT count(*) FROM payment_exceptions WHERE payment_id = $1",
                &[&payment],
            )
            .await
            .unwrap()
            .get(0)
    };
    // (Another notification: its id is its pspReference and event code.)
    notify_item(&app, "CAPTURE", true, &format!("{capture_ref}X"), &psp, None, "").await;
    wait_for("the amount-less capture's exception", async || {
        exceptions(&id).await == 1
    })
    .await;
    assert_eq!(
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"],
        "capturing"
    );
    notify(&app, "CAPTURE", true, &capture_ref, &psp, 1_500, "").await;
    status_is(&app, &id, "captured").await;
    assert_eq!(
        app.get(&format!("/api/v1/payments/{id}")).await.body["amount_captured"],
        1_500
    );

    // A refund Adyen receives, then confirms; another it receives and fails.
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": 500, "currency": "EUR" } }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("pending")),
        "{}",
        r.body
    );
    let ref1 = r.body["psp_reference"].as_str().unwrap().to_owned();
    assert!(ref1.starts_with("REF"));
    notify(&app, "REFUND", true, &ref1, &psp, 500, "").await;
    wait_for("the refund to succeed", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["amount_refunded"] == 500
    })
    .await;
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": 300, "currency": "EUR" } }),
        )
        .await;
    let (re2, ref2) = (
        r.body["refund_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    notify(
        &app,
        "REFUND_FAILED",
        true,
        &ref2,
        &psp,
        300,
        "Insufficient balance on payment",
    )
    .await;
    wait_for("the refund to fail", async || {
        app.get(&format!("/api/v1/refunds/{re2}")).await.body["status"] == "failed"
    })
    .await;
    let after = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(
        (after["amount_refunded"].as_i64(), after["status"].as_str()),
        (Some(500), Some("captured")),
        "{after}"
    );

    // A chargeback and its reversal.
    notify(&app, "CHARGEBACK", true, &psp, &psp, 1_000, "Fraudulent").await;
    status_is(&app, &id, "chargeback_open").await;
    notify(&app, "CHARGEBACK_REVERSED", true, &psp, &psp, 1_000, "").await;
    status_is(&app, &id, "settled").await;

    // Automatic capture: Authorised is captured; its AUTHORISATION notification changes nothing.
    let auto = pay(&app, 1_200, "pm_stored_card_2", "automatic").await;
    assert_eq!(auto["status"], "captured", "{auto}");
    let auto_psp = auto["psp_reference"].as_str().unwrap().to_owned();
    notify(&app, "AUTHORISATION", true, &auto_psp, "", 1_200, "").await;
    // Booked as captured at once; Adyen then says the capture failed: the books and Adyen
    // disagree about money, so an operator is told (nothing is moved on a guess).
    let auto_id = auto["payment_id"].as_str().unwrap().to_owned();
    notify(
        &app,
        "CAPTURE_FAILED",
        true,
        &format!("{auto_psp}C"),
        &auto_psp,
        1_200,
        "",
    )
    .await;
    wait_for("the failed capture's exception", async || {
        exceptions(&auto_id).await == 1
    })
    .await;
    assert_eq!(
        app.get(&format!("/api/v1/payments/{auto_id}")).await.body["status"],
        "captured"
    );

    // Refused: the payment's answer, with Adyen's reason as the decline code.
    let refused = pay(&app, 900, "pm_stored_refused", "automatic").await;
    assert_eq!(
        (refused["status"].as_str(), refused["failure"]["decline_code"].as_str()),
        (Some("failed"), Some("not_enough_balance")),
        "{refused}"
    );
    // A validation error is a refusal of the request: nothing happened at Adyen.
    let bad = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "o", "amount": { "value": 900, "currency": "EUR" }, "payment_method": "pm_stored_bad", "confirm": true }),
        )
        .await;
    assert_eq!(
        (bad.status, bad.body["error"]["code"].as_str()),
        (400, Some("psp_request_invalid")),
        "{}",
        bad.body
    );
    // "Request already processed or in progress" is not a refusal: the authorization may still
    // succeed there, so the attempt stays open (sent again under its key), and nothing is
    // answered as refused (a new confirm would be a new key: a second authorization).
    let busy = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "o", "amount": { "value": 900, "currency": "EUR" },
                    "payment_method": "pm_stored_in_progress", "confirm": true }),
        )
        .await;
    assert_eq!(busy.status, 503, "{}", busy.body);
    let open: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM psp_attempts WHERE operation = 'authorize' AND outcome IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 1, "the authorization's attempt stays open");

    // A capture Adyen fails leaves the authorization as it was; then a cancel.
    let p2 = pay(&app, 3_000, "pm_stored_card_3", "manual").await;
    let id2 = p2["payment_id"].as_str().unwrap().to_owned();
    let psp2 = p2["psp_reference"].as_str().unwrap().to_owned();
    let r = app.post(&format!("/api/v1/payments/{id2}/capture"), json!({})).await;
    assert_eq!(r.body["status"], "capturing", "{}", r.body);
    let cap = last_modification(&seen, "/captures", "CAP");
    notify(&app, "CAPTURE_FAILED", true, &cap, &psp2, 3_000, "Capture failed").await;
    status_is(&app, &id2, "authorized").await;
    let r = app.post(&format!("/api/v1/payments/{id2}/cancel"), json!({})).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        r.body
    );

    // Adyen's CANCELLATION confirms what payrail already took as done: recorded, nothing moves.
    notify(&app, "CANCELLATION", true, &psp2, &psp2, 3_000, "").await;

    // An authorization Adyen takes and decides later: `processing`, no second confirm, then its
    // AUTHORISATION decides (it finds the payment by the reference kept from the answer).
    let held = pay(&app, 700, "pm_stored_pending_1", "manual").await;
    assert_eq!(held["status"], "processing", "{held}");
    let held_id = held["payment_id"].as_str().unwrap().to_owned();
    let held_psp = held["psp_reference"].as_str().unwrap().to_owned();
    let again = app
        .post(&format!("/api/v1/payments/{held_id}/confirm"), json!({}))
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    notify(&app, "AUTHORISATION", true, &held_psp, "", 700, "").await;
    status_is(&app, &held_id, "authorized").await;
    let declined = pay(&app, 800, "pm_stored_pending_2", "automatic").await;
    assert_eq!(declined["status"], "processing", "{declined}");
    let declined_id = declined["payment_id"].as_str().unwrap().to_owned();
    notify(
        &app,
        "AUTHORISATION",
        false,
        declined["psp_reference"].as_str().unwrap(),
        "",
        800,
        "Not enough balance",
    )
    .await;
    status_is(&app, &declined_id, "failed").await;
    let failed = app.get(&format!("/api/v1/payments/{declined_id}")).await.body;
    assert_eq!(failed["failure"]["decline_code"], "not_enough_balance", "{failed}");
    let auto = pay(&app, 900, "pm_stored_pending_3", "automatic").await;
    let auto_id = auto["payment_id"].as_str().unwrap().to_owned();
    notify(
        &app,
        "AUTHORISATION",
        true,
        auto["psp_reference"].as_str().unwrap(),
        "",
        900,
        "",
    )
    .await;
    status_is(&app, &auto_id, "captured").await;
    let canceled = app.get(&format!("/api/v1/payments/{id2}")).await.body;
    assert_eq!(canceled["status"], "canceled");

    // Every request payrail sent, checked against what Adyen documents.
    let attempts: Vec<(String, String)> = app
        .sql()
        .await
        .query(
            "SELECT id, operation FROM psp_attempts WHERE connector_id = 'mca_adyen_double' ORDER BY started_at, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), attempts.len(), "one request per attempt: {seen:#?}");
    for (s, (attempt, op)) in seen.iter().zip(&attempts) {
        assert!(s.line.starts_with("POST /v71/payments"), "{}", s.line);
        assert_eq!(s.header("x-api-key"), Some(API_KEY));
        assert_eq!(s.header("idempotency-key"), Some(attempt.as_str()), "{}", s.line);
        assert_eq!(s.header("content-type"), Some("application/json"));
        assert_eq!(s.body["merchantAccount"], ACCOUNT);
        let path_ok = match op.as_str() {
            "authorize" => s.line.starts_with("POST /v71/payments HTTP"),
            "capture" => s.line.contains("/captures "),
            "refund" => s.line.contains("/refunds "),
            _ => s.line.contains("/cancels "),
        };
        assert!(path_ok, "{op}: {}", s.line);
        if op != "cancel" {
            assert_eq!(s.body["amount"]["currency"], "EUR", "{}", s.body);
            assert!(s.body["amount"]["value"].is_i64(), "minor units: {}", s.body);
        }
    }
    let first = &seen[0].body;
    assert_eq!(first["amount"], json!({ "currency": "EUR", "value": 2000 }));
    assert_eq!(
        first["paymentMethod"],
        json!({ "type": "scheme", "storedPaymentMethodId": "stored_card_1" })
    );
    assert_eq!(first["additionalData"]["manualCapture"], "true");
    assert_eq!(first["reference"], id.as_str());
    assert_eq!(seen[1].body["amount"], json!({ "currency": "EUR", "value": 1500 }));
    assert!(
        seen.iter().any(|s| s.body["captureDelayHours"] == 0),
        "automatic capture asks for no delay"
    );

    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
            "ledger",
            "verify",
        ])
        .env("PAYRAIL__DATABASE__URL", &app.database_url)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert_eq!(app.count("dead_letters").await, 0);
}
