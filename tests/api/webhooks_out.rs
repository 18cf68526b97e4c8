//! Merchant webhooks: the events API, endpoints, signed deliveries (verified by stripe-python),
//! filters, rotation, retries and the delivery log, redelivery, disabling, and SSRF refusals.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use payrail::adapters::psp::signature::verify_stripe;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Hit {
    pub signature: String,
    pub body: Vec<u8>,
    pub event: Value,
}

/// A local HTTP endpoint that records what it receives and answers `status`, with `answer` as
/// the body if set, and `Location: <redirect>` if set, after `delay_ms`.
pub struct Receiver {
    pub url: String,
    pub hits: Arc<Mutex<Vec<Hit>>>,
    pub status: Arc<AtomicU16>,
    pub answer: Arc<Mutex<Option<String>>>,
    pub redirect: Arc<Mutex<Option<String>>>,
    pub delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let answer: Arc<Mutex<Option<String>>> = Arc::default();
        let redirect: Arc<Mutex<Option<String>>> = Arc::default();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (h, s, a, r, d) = (
            hits.clone(),
            status.clone(),
            answer.clone(),
            redirect.clone(),
            delay_ms.clone(),
        );
        let server = HttpServer::new(move || {
            let (h, s, a, r, d) = (h.clone(), s.clone(), a.clone(), r.clone(), d.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (h, s, a, r, d) = (h.clone(), s.clone(), a.clone(), r.clone(), d.clone());
                async move {
                    let signature = req
                        .headers()
                        .get("Payrail-Signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    h.lock().unwrap().push(Hit {
                        signature,
                        body: body.to_vec(),
                        event,
                    });
                    let delay = d.load(Ordering::SeqCst);
                    if delay > 0 {
                        actix_rt::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let code = s.load(Ordering::SeqCst);
                    let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap());
                    if let Some(to) = r.lock().unwrap().clone() {
                        resp.insert_header(("Location", to));
                    }
                    let text = a
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| format!("receiver says {code}"));
                    resp.body(text)
                }
            }))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        actix_rt::spawn(server);
        Receiver {
            url: format!("http://127.0.0.1:{port}/hooks"),
            hits,
            status,
            answer,
            redirect,
            delay_ms,
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The hits of events of `type`.
    pub fn of_type(&self, event_type: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.event["type"] == event_type)
            .collect()
    }
}

async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the endpoint's latest delivery is recorded as succeeded.
async fn wait_for_latest_delivery_succeeded(app: &TestApp, endpoint: &str, what: &str) {
    wait_for(what, 15, async || {
        let log = app
            .get(&format!("/api/v1/webhook_endpoints/{endpoint}/deliveries"))
            .await;
        log.body["data"][0]["status"] == "succeeded"
    })
    .await;
}

async fn create_endpoint(app: &TestApp, body: Value) -> Value {
    let r = app.post("/api/v1/webhook_endpoints", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

/// Runs stripe-python's `WebhookSignature.verify_header` on each (payload, header, secret,
/// expected verdict), on a blocking thread: the first run makes the venv, which takes a while,
/// and the test's runtime (which serves its receiver) must not stall meanwhile.
async fn stripe_python_verifies(checks: &[(Vec<u8>, String, String, bool)]) {
    let input: Vec<Value> = checks
        .iter()
        .map(|(p, h, s, e)| json!({ "payload": String::from_utf8(p.clone()).unwrap(), "header": h, "secret": s, "expect": e }))
        .collect();
    let input = Value::from(input).to_string();
    let out = tokio::task::spawn_blocking(move || {
        // Bounded: the checker's first run builds its venv from PyPI.
        let mut child = std::process::Command::new("timeout")
            .args(["--kill-after=5", "600", "python3"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/checks/stripe_signature.py"
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "stripe-python: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[actix_web::test]
async fn events_are_listed_newest_first_filtered_and_read_one_by_one() {
    let app = spawn_app().await;
    let before = chrono::Utc::now().timestamp() - 1;
    for _ in 0..3 {
        assert_eq!(app.pay(1000, "pm_card_visa", "automatic", true).await.status, 201);
    }
    let all = app.get("/api/v1/events?limit=100").await;
    assert_eq!(all.status, 200);
    let data = all.body["data"].as_array().unwrap();
    assert!(data.len() >= 6, "created and captured for each: {}", all.body);
    let ids: Vec<&str> = data.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "newest first");
    let first = &data[0];
    assert_eq!(first["object"], "event");
    assert!(first["id"].as_str().unwrap().starts_with("evt_"));
    assert!(first["created"].as_i64().unwrap() >= before);
    assert_eq!(first["data"]["object"]["object"], "payment");

    let created = app.get("/api/v1/events?type=payment.created&limit=100").await;
    assert_eq!(created.body["data"].as_array().unwrap().len(), 3);
    let family = app.get("/api/v1/events?type=payment.*&limit=100").await;
    assert_eq!(family.body["data"].as_array().unwrap().len(), data.len());
    assert_eq!(app.get("/api/v1/events?type=refund.*").await.body["data"], json!([]));
    let future = chrono::Utc::now().timestamp() + 3600;
    let none = app.get(&format!("/api/v1/events?created%5Bgte%5D={future}")).await;
    assert_eq!((none.status, none.body["data"].clone()), (200, json!([])));
    let since = app
        .get(&format!("/api/v1/events?created[gte]={before}&limit=100"))
        .await;
    assert_eq!(since.body["data"].as_array().unwrap().len(), data.len());
    assert_eq!(app.get("/api/v1/events?type=ledger.x").await.status, 400);

    // Cursor pagination walks every event once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = app.get(&format!("/api/v1/events?limit=2{cursor}")).await;
        let items = page.body["data"].as_array().unwrap().clone();
        seen.extend(items.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        if !page.body["has_more"].as_bool().unwrap() {
            break;
        }
        cursor = format!("&starting_after={}", items.last().unwrap()["id"].as_str().unwrap());
    }
    assert_eq!(seen, ids);

    let one = app.get(&format!("/api/v1/events/{}", ids[0])).await;
    assert_eq!((one.status, one.body.clone()), (200, data[0].clone()));
    assert_eq!(app.get("/api/v1/events/evt_nope").await.status, 404);
    let other = app.new_merchant().await;
    let theirs = app
        .request("GET", &format!("/api/v1/events/{}", ids[0]), Some(&other), None, None)
        .await;
    assert_eq!(theirs.status, 404, "another merchant's event does not exist for it");
}

#[actix_web::test]
async fn deliveries_are_signed_as_stripe_signs_and_stripe_python_verifies_them() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let endpoint = create_endpoint(&app, json!({ "url": receiver.url, "description": "orders" })).await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() > 40);
    assert_eq!(endpoint["enabled_events"], json!(["*"]));
    let id = endpoint["id"].as_str().unwrap().to_owned();
    // The secret is shown once.
    let read = app.get(&format!("/api/v1/webhook_endpoints/{id}")).await;
    assert_eq!(read.status, 200);
    assert!(read.body.get("secret").is_none() && !read.raw.windows(6).any(|w| w == b"whsec_"));
    let listed = app.get("/api/v1/webhook_endpoints").await;
    assert!(!listed.raw.windows(6).any(|w| w == b"whsec_"));

    let paid = app.pay(2500, "pm_card_visa", "automatic", true).await;
    let payment = paid.body["payment_id"].as_str().unwrap().to_owned();
    wait_for("payment.captured delivered", 15, async || {
        !receiver.of_type("payment.captured").is_empty()
    })
    .await;
    let hit = receiver.of_type("payment.captured").remove(0);
    assert_eq!(hit.event["data"]["object"]["payment_id"], payment);
    // The same event as the events API shows, byte for byte in meaning.
    let listed = app
        .get(&format!("/api/v1/events/{}", hit.event["id"].as_str().unwrap()))
        .await;
    assert_eq!(listed.body, hit.event);
    let now = chrono::Utc::now().timestamp();
    assert!(verify_stripe(&hit.signature, &hit.body, &[&secret], 300, now).is_ok());
    let mut tampered = hit.body.clone();
    tampered[10] ^= 1;
    stripe_python_verifies(&[
        (hit.body.clone(), hit.signature.clone(), secret.clone(), true),
        (tampered, hit.signature.clone(), secret.clone(), false),
        (hit.body.clone(), hit.signature.clone(), "whsec_wrong".into(), false),
    ])
    .await;

    // The delivery log shows it delivered.
    wait_for("the log to show it", 15, async || {
        let log = app
            .get(&format!(
                "/api/v1/webhook_endpoints/{id}/deliveries?status=succeeded&limit=100"
            ))
            .await;
        log.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["event_id"] == hit.event["id"])
    })
    .await;
    let log = app
        .get(&format!("/api/v1/webhook_endpoints/{id}/deliveries?limit=100"))
        .await;
    let d = log.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event_id"] == hit.event["id"])
        .unwrap()
        .clone();
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["last_attempt"]["status_code"], 200);
    assert_eq!(d["last_attempt"]["response_body"], "receiver says 200");
    assert!(d["last_attempt"]["latency_ms"].as_i64().is_some());
    assert!(d["next_retry_at"].is_null());
}

#[actix_web::test]
async fn an_endpoint_receives_only_the_events_it_enabled() {
    let app = spawn_app().await;
    let (narrow, wide) = (Receiver::start().await, Receiver::start().await);
    create_endpoint(
        &app,
        json!({ "url": narrow.url, "enabled_events": ["payment.captured", "refund.*"] }),
    )
    .await;
    create_endpoint(&app, json!({ "url": wide.url, "enabled_events": ["*"] })).await;
    let paid = app.pay(3000, "pm_card_visa", "automatic", true).await;
    let p = paid.body["payment_id"].as_str().unwrap();
    let refund = app
        .post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 500, "currency": "USD" } }),
        )
        .await;
    assert!(refund.status < 300, "{}", refund.body);
    wait_for("the wide endpoint to have all", 15, async || {
        !wide.of_type("refund.succeeded").is_empty() && !wide.of_type("payment.created").is_empty()
    })
    .await;
    wait_for("the narrow endpoint to have its own", 15, async || {
        !narrow.of_type("refund.succeeded").is_empty() && !narrow.of_type("payment.captured").is_empty()
    })
    .await;
    let types: Vec<String> = narrow
        .hits()
        .iter()
        .map(|h| h.event["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        types
            .iter()
            .all(|t| t == "payment.captured" || t.starts_with("refund.")),
        "{types:?}"
    );
    let bad = app
        .post(
            "/api/v1/webhook_endpoints",
            json!({ "url": narrow.url, "enabled_events": ["ledger.*"] }),
        )
        .await;
    assert_eq!(
        (bad.status, bad.body["error"]["param"].clone()),
        (400, json!("enabled_events"))
    );
}

#[actix_web::test]
async fn a_rotated_secret_signs_beside_the_old_one_during_the_overlap() {
    let app = spawn_app_with(|c| c.webhooks_out.secret_overlap_secs = 3).await;
    let receiver = Receiver::start().await;
    let endpoint = create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    let (id, old) = (
        endpoint["id"].as_str().unwrap().to_owned(),
        endpoint["secret"].as_str().unwrap().to_owned(),
    );
    let key = uuid::Uuid::new_v4().to_string();
    let path = format!("/api/v1/webhook_endpoints/{id}/rotate_secret");
    let rotated = app.request("POST", &path, Some(DEMO_KEY), Some(&key), None).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let new = rotated.body["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(rotated.body["previous_secret_expires_at"].is_string());
    // The same request again rotates nothing more.
    let again = app.request("POST", &path, Some(DEMO_KEY), Some(&key), None).await;
    assert_eq!(again.body["secret"], rotated.body["secret"]);

    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("a delivery", 15, async || !receiver.hits().is_empty()).await;
    let hit = receiver.hits().remove(0);
    assert_eq!(
        hit.signature.matches("v1=").count(),
        2,
        "both secrets sign during the overlap"
    );
    let now = chrono::Utc::now().timestamp();
    assert!(verify_stripe(&hit.signature, &hit.body, &[&old], 300, now).is_ok());
    assert!(verify_stripe(&hit.signature, &hit.body, &[&new], 300, now).is_ok());
    stripe_python_verifies(&[
        (hit.body.clone(), hit.signature.clone(), old.clone(), true),
        (hit.body.clone(), hit.signature.clone(), new.clone(), true),
    ])
    .await;

    // After the overlap only the new secret signs.
    actix_rt::time::sleep(Duration::from_millis(3100)).await;
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("a second delivery", 15, async || receiver.hits().len() >= 2).await;
    let later = receiver.hits().remove(1);
    assert_eq!(later.signature.matches("v1=").count(), 1);
    let now = chrono::Utc::now().timestamp();
    assert!(verify_stripe(&later.signature, &later.body, &[&new], 300, now).is_ok());
    assert!(verify_stripe(&later.signature, &later.body, &[&old], 300, now).is_err());
    let read = app.get(&format!("/api/v1/webhook_endpoints/{id}")).await;
    assert!(read.body["previous_secret_expires_at"].is_null());
}

#[actix_web::test]
async fn failed_deliveries_are_retried_with_backoff_logged_and_redelivered_on_request() {
    let app = spawn_app_with(|c| {
        c.webhooks_out.retry_base_ms = 200;
        c.webhooks_out.retry_max_ms = 400;
        c.webhooks_out.poll_interval_ms = 50;
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.status.store(500, Ordering::SeqCst);
    let endpoint = create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("three failed attempts", 15, async || receiver.hits().len() >= 3).await;
    let log = app.get(&format!("/api/v1/webhook_endpoints/{id}/deliveries")).await;
    let d = &log.body["data"][0];
    assert_eq!(d["status"], "pending");
    assert!(d["attempts"].as_i64().unwrap() >= 2, "{d}");
    assert_eq!(d["last_attempt"]["status_code"], 500);
    assert_eq!(d["last_attempt"]["response_body"], "receiver says 500");
    assert!(d["last_attempt"]["error"].as_str().unwrap().contains("500"));
    assert!(d["next_retry_at"].is_string());
    let read = app.get(&format!("/api/v1/webhook_endpoints/{id}")).await;
    assert!(read.body["failing_since"].is_string());

    receiver.status.store(200, Ordering::SeqCst);
    wait_for_latest_delivery_succeeded(&app, &id, "the retry to succeed").await;
    let read = app.get(&format!("/api/v1/webhook_endpoints/{id}")).await;
    assert!(read.body["failing_since"].is_null(), "healthy again");
    let event = receiver.hits()[0].event["id"].as_str().unwrap().to_owned();
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    let text = String::from_utf8_lossy(&metrics.raw);
    for needle in [
        "payrail_webhook_deliveries_total{outcome=\"http_error\"}",
        "payrail_webhook_deliveries_total{outcome=\"succeeded\"} 1",
        "payrail_webhook_retry_queue 0",
        "payrail_webhook_oldest_undelivered_seconds{endpoint_kind=\"failing\"}",
        "payrail_actors_live{actor=\"webhook_endpoint\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }

    // Redelivery: to this endpoint, and to all that want it.
    let n = receiver.hits().len();
    let r = app
        .post(&format!("/api/v1/events/{event}/redeliver"), json!({ "endpoint": id }))
        .await;
    assert_eq!(
        (r.status, r.body["endpoints"].clone()),
        (200, json!([id])),
        "{}",
        r.body
    );
    wait_for("the redelivery", 15, async || receiver.hits().len() > n).await;
    let r = app.post_raw(&format!("/api/v1/events/{event}/redeliver"), "").await;
    assert_eq!(r.body["endpoints"], json!([id]));
    wait_for("the second redelivery", 15, async || receiver.hits().len() > n + 1).await;
    assert!(receiver.hits()[n..].iter().all(|h| h.event["id"] == event.as_str()));
    let r = app
        .post(
            &format!("/api/v1/events/{event}/redeliver"),
            json!({ "endpoint": "we_nope" }),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[actix_web::test]
async fn an_endpoint_failing_for_the_whole_window_is_disabled_and_says_so() {
    let app = spawn_app_with(|c| {
        c.webhooks_out.retry_window_secs = 2;
        c.webhooks_out.retry_base_ms = 200;
        c.webhooks_out.retry_max_ms = 300;
        c.webhooks_out.poll_interval_ms = 50;
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.status.store(503, Ordering::SeqCst);
    let endpoint = create_endpoint(&app, json!({ "url": receiver.url })).await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("the endpoint to be disabled", 20, async || {
        app.get(&format!("/api/v1/webhook_endpoints/{id}")).await.body["status"] == "disabled"
    })
    .await;
    let read = app.get(&format!("/api/v1/webhook_endpoints/{id}")).await;
    assert!(read.body["disabled_reason"].as_str().unwrap().contains("retry window"));
    let events = app.get("/api/v1/events?type=webhook_endpoint.disabled").await;
    assert_eq!(
        events.body["data"][0]["data"]["object"]["id"],
        id.as_str(),
        "{}",
        events.body
    );
    let log = app
        .get(&format!("/api/v1/webhook_endpoints/{id}/deliveries?status=pending"))
        .await;
    assert_eq!(log.body["data"], json!([]), "nothing left pending");
    // Operators see it too.
    let token = app.state.config.admin.token.clone();
    let ops = app
        .request(
            "GET",
            "/admin/v1/webhook_endpoints?status=disabled",
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(ops.status, 200);
    assert_eq!(ops.body["data"][0]["id"], id.as_str());
    assert!(ops.body["data"][0]["merchant_id"].as_str().unwrap().starts_with("mer_"));
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    assert!(String::from_utf8_lossy(&metrics.raw).contains("payrail_webhook_endpoints_disabled_total 1"));
    // Nothing more is sent to a disabled endpoint; enabling it again sends new events.
    receiver.status.store(200, Ordering::SeqCst);
    let r = app
        .post(&format!("/api/v1/webhook_endpoints/{id}"), json!({ "disabled": false }))
        .await;
    assert_eq!((r.status, r.body["status"].clone()), (200, json!("enabled")));
    let paid = app.pay(100, "pm_card_visa", "manual", false).await;
    let p = paid.body["payment_id"].as_str().unwrap().to_owned();
    wait_for("a delivery after enabling", 15, async || {
        receiver
            .hits()
            .iter()
            .any(|h| h.event["data"]["object"]["payment_id"] == p.as_str() && h.event["type"] == "payment.created")
    })
    .await;
}

#[actix_web::test]
async fn private_targets_are_refused_at_creation_and_at_connection() {
    let app = spawn_app_with(|c| c.webhooks_out.allow_private_targets = false).await;
    for url in [
        "http://example.com/hooks",
        "https://127.0.0.1/hooks",
        "https://10.0.0.1/hooks",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hooks",
        "https://localhost/hooks",
        "ftp://example.com/",
    ] {
        let r = app.post("/api/v1/webhook_endpoints", json!({ "url": url })).await;
        assert_eq!(r.status, 400, "{url}: {}", r.body);
        assert_eq!(r.body["error"]["param"], "url", "{url}");
    }
    assert_eq!(app.count("webhook_endpoints").await, 0);

    // A name that resolved to a public address when it was stored and to loopback now (DNS
    // rebinding): the connection is refused, and nothing reaches the receiver.
    let receiver = Receiver::start().await;
    let port = receiver
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let merchant: String = app
        .sql()
        .await
        .query_one("SELECT merchant_id FROM api_keys LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    app.sql()
        .await
        .execute(
            "INSERT INTO webhook_endpoints (id, merchant_id, url, enabled_events, secret)
             VALUES ('we_rebound', $1, $2, ARRAY['*'], 'whsec_x')",
            &[&merchant, &format!("https://localhost:{port}/hooks")],
        )
        .await
        .unwrap();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("the refused attempt in the log", 15, async || {
        let log = app.get("/api/v1/webhook_endpoints/we_rebound/deliveries").await;
        log.body["data"][0]["last_attempt"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("private, loopback or link-local"))
    })
    .await;
    assert!(receiver.hits().is_empty());
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    assert!(
        String::from_utf8_lossy(&metrics.raw).contains("payrail_webhook_deliveries_total{outcome=\"refused_target\"}")
    );
}

#[actix_web::test]
async fn a_merchant_created_with_a_webhook_url_has_it_as_its_first_endpoint() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let token = app.state.config.admin.token.clone();
    let body = json!({ "name": "Hooked", "default_currency": "USD", "webhook_url": receiver.url }).to_string();
    let r = app
        .request("POST", "/admin/v1/merchants", Some(&token), None, Some(&body))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let endpoint = &r.body["webhook_endpoint"];
    assert_eq!(endpoint["url"], receiver.url.as_str());
    assert_eq!(endpoint["enabled_events"], json!(["*"]));
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    let key = r.body["api_key"].as_str().unwrap().to_owned();
    let listed = app
        .request("GET", "/api/v1/webhook_endpoints", Some(&key), None, None)
        .await;
    assert_eq!(listed.body["data"][0]["id"], endpoint["id"]);
    let pay =
        json!({ "order_id": "o", "amount": { "value": 700, "currency": "USD" }, "payment_method": "pm_card_visa" });
    let paid = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(&key),
            Some("k1"),
            Some(&pay.to_string()),
        )
        .await;
    assert_eq!(paid.status, 201);
    wait_for("its delivery", 15, async || !receiver.hits().is_empty()).await;
    let hit = receiver.hits().remove(0);
    let now = chrono::Utc::now().timestamp();
    assert!(verify_stripe(&hit.signature, &hit.body, &[&secret], 300, now).is_ok());

    // The endpoint cannot be stored (the database refuses it, here by a trigger of the test's
    // own): the merchant and its key are made, and the key is answered all the same.
    app.sql()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_endpoints() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
             CREATE TRIGGER refuse_endpoints BEFORE INSERT ON webhook_endpoints
                 FOR EACH ROW EXECUTE FUNCTION refuse_endpoints();",
        )
        .await
        .unwrap();
    let body = json!({ "name": "Unhooked", "default_currency": "USD", "webhook_url": receiver.url }).to_string();
    let r = app
        .request("POST", "/admin/v1/merchants", Some(&token), None, Some(&body))
        .await;
    assert_eq!(
        (r.status, r.body["webhook_endpoint"].clone()),
        (201, Value::Null),
        "{}",
        r.body
    );
    let key = r.body["api_key"].as_str().unwrap().to_owned();
    let listed = app
        .request("GET", "/api/v1/webhook_endpoints", Some(&key), None, None)
        .await;
    assert_eq!((listed.status, listed.body["data"].clone()), (200, json!([])));
}

#[actix_web::test]
async fn endpoints_are_updated_deleted_and_bounded() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let e = create_endpoint(&app, json!({ "url": receiver.url })).await;
    let id = e["id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/webhook_endpoints/{id}"),
            json!({ "enabled_events": ["dispute.*"], "description": "disputes only" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["enabled_events"].clone(), r.body["description"].clone()),
        (json!(["dispute.*"]), json!("disputes only"))
    );
    assert!(r.body.get("secret").is_none());
    // A retry after the key's record expired finds the endpoint, and does not show its secret.
    let body = json!({ "url": receiver.url }).to_string();
    let first = app
        .request(
            "POST",
            "/api/v1/webhook_endpoints",
            Some(DEMO_KEY),
            Some("expiring-key"),
            Some(&body),
        )
        .await;
    assert_eq!(first.status, 201);
    app.sql()
        .await
        .execute("DELETE FROM idempotency_keys", &[])
        .await
        .unwrap();
    let again = app
        .request(
            "POST",
            "/api/v1/webhook_endpoints",
            Some(DEMO_KEY),
            Some("expiring-key"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (again.status, again.body["id"].clone()),
        (200, first.body["id"].clone())
    );
    assert!(again.body.get("secret").is_none(), "{}", again.body);
    let missing = app
        .post("/api/v1/webhook_endpoints/we_nope", json!({ "description": "x" }))
        .await;
    assert_eq!(missing.status, 404);
    for _ in 2..16 {
        create_endpoint(&app, json!({ "url": receiver.url })).await;
    }
    let over = app
        .post("/api/v1/webhook_endpoints", json!({ "url": receiver.url }))
        .await;
    assert_eq!(
        (over.status, over.body["error"]["code"].clone()),
        (400, json!("too_many_endpoints"))
    );
    let gone = app
        .request(
            "DELETE",
            &format!("/api/v1/webhook_endpoints/{id}"),
            Some(DEMO_KEY),
            None,
            None,
        )
        .await;
    assert_eq!((gone.status, gone.body["deleted"].clone()), (200, json!(true)));
    assert_eq!(app.get(&format!("/api/v1/webhook_endpoints/{id}")).await.status, 404);
    let other = app.new_merchant().await;
    let theirs = app
        .request("GET", "/api/v1/webhook_endpoints", Some(&other), None, None)
        .await;
    assert_eq!(theirs.body["data"], json!([]));
}

#[actix_web::test]
async fn events_committed_while_nats_is_down_are_delivered_once_it_is_back() {
    let port = crate::helpers::free_port();
    let store = std::env::temp_dir().join(format!("payrail-nats-wh-{port}"));
    let mut nats = crate::outages::nats_server(port, &store);
    let probe = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(probe.elapsed() < Duration::from_secs(10), "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let app = spawn_app_with(|c| c.nats.url = format!("nats://127.0.0.1:{port}")).await;
    let receiver = Receiver::start().await;
    create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.captured"] }),
    )
    .await;
    let before = app.pay(100, "pm_card_visa", "automatic", true).await;
    wait_for("a delivery before the outage", 15, async || receiver.hits().len() == 1).await;

    nats.kill().unwrap();
    let _ = nats.wait();
    // Payments need no NATS: their events wait in the outbox.
    let mut paid = Vec::new();
    for _ in 0..3 {
        let r = app.pay(100, "pm_card_visa", "automatic", true).await;
        assert_eq!(r.status, 201, "{}", r.body);
        paid.push(r.body["payment_id"].as_str().unwrap().to_owned());
    }
    let mut nats = crate::outages::nats_server(port, &store);
    wait_for("every event committed during the outage", 30, async || {
        let got: Vec<String> = receiver
            .hits()
            .iter()
            .map(|h| {
                h.event["data"]["object"]["payment_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        paid.iter().all(|p| got.contains(p))
    })
    .await;
    let first = before.body["payment_id"].as_str().unwrap();
    let hits = receiver.hits();
    assert_eq!(
        hits.iter()
            .filter(|h| h.event["data"]["object"]["payment_id"] == first)
            .count(),
        1,
        "the event from before the outage is not sent again"
    );
    nats.kill().unwrap();
    let _ = nats.wait();
    let _ = std::fs::remove_dir_all(&store);
}

#[actix_web::test]
async fn redirects_are_not_followed_and_only_the_first_kib_of_an_answer_is_kept() {
    let app = spawn_app_with(|c| {
        c.webhooks_out.retry_base_ms = 60_000;
        c.webhooks_out.retry_max_ms = 60_000;
    })
    .await;
    let (redirecting, elsewhere) = (Receiver::start().await, Receiver::start().await);
    redirecting.status.store(307, Ordering::SeqCst);
    *redirecting.redirect.lock().unwrap() = Some(elsewhere.url.clone());
    // 4 KiB of an answer with a NUL and multi-byte characters in it: stored cut, as text.
    *redirecting.answer.lock().unwrap() = Some(format!("é\0{}", "x".repeat(4096)));
    let e = create_endpoint(
        &app,
        json!({ "url": redirecting.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    let id = e["id"].as_str().unwrap().to_owned();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("the attempt in the log", 15, async || {
        let log = app.get(&format!("/api/v1/webhook_endpoints/{id}/deliveries")).await;
        log.body["data"][0]["attempts"] == 1
    })
    .await;
    let log = app.get(&format!("/api/v1/webhook_endpoints/{id}/deliveries")).await;
    let last = &log.body["data"][0]["last_attempt"];
    assert_eq!(last["status_code"], 307, "a redirect is an answer, not a success");
    let kept = last["response_body"].as_str().unwrap();
    assert!(kept.len() <= 1024 && kept.len() > 1000, "{} bytes kept", kept.len());
    assert!(kept.starts_with("é\u{fffd}x"), "NUL is not stored: {:?}", &kept[..8]);
    assert_eq!(log.body["data"][0]["status"], "pending", "it is retried");
    assert_eq!(redirecting.hits().len(), 1);
    assert!(elsewhere.hits().is_empty(), "the redirect was not followed");
}

#[actix_web::test]
async fn an_event_jetstream_delivers_again_is_not_delivered_twice() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    let first = app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("the first delivery", 15, async || receiver.hits().len() == 1).await;
    let hit = receiver.hits().remove(0);
    // The same event again in the stream (a batch redelivered after a lost ack, a relay that
    // published it twice outside the duplicate window): its delivery already exists.
    let nats = &app.state.nats;
    let merchant = first.body["merchant_id"].as_str().unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "outbox-again-1");
    nats.jetstream
        .publish_with_headers(
            format!("{}.events.{merchant}", nats.prefix),
            headers,
            hit.body.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // The dispatcher reads the stream in order: once a later event has arrived, the repeat was
    // read before it.
    let later = app.pay(100, "pm_card_visa", "manual", false).await;
    let later = later.body["payment_id"].as_str().unwrap().to_owned();
    wait_for("the later event", 15, async || {
        receiver
            .hits()
            .iter()
            .any(|h| h.event["data"]["object"]["payment_id"] == later.as_str())
    })
    .await;
    let times = receiver
        .hits()
        .iter()
        .filter(|h| h.event["id"] == hit.event["id"])
        .count();
    assert_eq!(times, 1, "the repeated event was delivered again");
}

#[actix_web::test]
async fn a_delivery_whose_lease_ran_out_is_made_by_the_poller() {
    let app = spawn_app_with(|c| c.webhooks_out.poll_interval_ms = 50).await;
    let receiver = Receiver::start().await;
    // An event from before the endpoint existed: nothing will send it on its own.
    app.pay(100, "pm_card_visa", "manual", false).await;
    let event = app.get("/api/v1/events?type=payment.created").await.body["data"][0].clone();
    let endpoint = create_endpoint(&app, json!({ "url": receiver.url, "enabled_events": ["refund.*"] })).await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    // A node claimed it, then died: its lease ended a second ago.
    let row = payrail::domain::webhook::parse_event_id(event["id"].as_str().unwrap()).unwrap();
    app.sql()
        .await
        .execute(
            "INSERT INTO webhook_deliveries (endpoint_id, event_id, next_attempt_at, retry_until)
             VALUES ($1, $2, now() - interval '1 second', now() + interval '1 hour')",
            &[&id, &row],
        )
        .await
        .unwrap();
    wait_for("the poller to deliver it", 15, async || {
        receiver.hits().iter().any(|h| h.event["id"] == event["id"])
    })
    .await;
    wait_for_latest_delivery_succeeded(&app, &id, "the log to say so").await;
    assert_eq!(receiver.hits().len(), 1);
}

#[actix_web::test]
async fn a_redelivery_asked_for_while_a_delivery_is_under_way_is_made_too() {
    // The outcome of the attempt under way must not be recorded over the new request.
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let endpoint = create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for("the first delivery", 15, async || !receiver.hits().is_empty()).await;
    let event = receiver.hits()[0].event["id"].as_str().unwrap().to_owned();
    wait_for_latest_delivery_succeeded(&app, &id, "the first delivery to be recorded").await;
    // The endpoint answers slowly: the redelivery is under way while the second is asked for.
    receiver.delay_ms.store(1500, Ordering::SeqCst);
    let redeliver = async || {
        let r = app
            .post(&format!("/api/v1/events/{event}/redeliver"), json!({ "endpoint": id }))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    };
    redeliver().await;
    wait_for("the redelivery to arrive", 15, async || receiver.hits().len() == 2).await;
    redeliver().await;
    receiver.delay_ms.store(0, Ordering::SeqCst);
    wait_for("the second redelivery", 15, async || receiver.hits().len() >= 3).await;
    assert!(receiver.hits().iter().all(|h| h.event["id"] == event.as_str()));
    wait_for_latest_delivery_succeeded(&app, &id, "the last one to be recorded").await;
}

#[actix_web::test]
async fn queued_deliveries_go_to_the_endpoint_as_it_is_now_not_as_it_was_when_queued() {
    // One POST at a time to a slow endpoint: the others wait in its mailbox while the merchant
    // moves the endpoint to another URL, then deletes it.
    let app = spawn_app_with(|c| c.webhooks_out.max_in_flight_per_endpoint = 1).await;
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    old.delay_ms.store(1500, Ordering::SeqCst);
    let endpoint = create_endpoint(&app, json!({ "url": old.url, "enabled_events": ["payment.created"] })).await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        assert_eq!(app.pay(100, "pm_card_visa", "manual", false).await.status, 201);
    }
    wait_for("the first POST to the old URL", 15, async || !old.hits().is_empty()).await;
    let moved = app
        .post(&format!("/api/v1/webhook_endpoints/{id}"), json!({ "url": new.url }))
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    wait_for("all five events", 30, async || {
        let mut ids: Vec<String> = old
            .hits()
            .iter()
            .chain(new.hits().iter())
            .map(|h| h.event["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() == 5
    })
    .await;
    assert_eq!(
        old.hits().len(),
        1,
        "only the POST under way when the URL changed went to the old URL"
    );
    assert_eq!(new.hits().len(), 4);

    // Deleted while deliveries wait: none of them is sent.
    new.delay_ms.store(1500, Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(app.pay(100, "pm_card_visa", "manual", false).await.status, 201);
    }
    wait_for("the first of the next four", 15, async || new.hits().len() == 5).await;
    let r = app
        .request(
            "DELETE",
            &format!("/api/v1/webhook_endpoints/{id}"),
            Some(DEMO_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    // The POST under way ends (1.5 s); whatever else waited would follow within as long again.
    let settled = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settled {
        assert_eq!(new.hits().len(), 5, "a delivery of a deleted endpoint was sent");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn a_redelivery_to_an_endpoint_disabled_meanwhile_makes_no_delivery() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let endpoint = create_endpoint(&app, json!({ "url": receiver.url })).await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    app.pay(100, "pm_card_visa", "manual", false).await;
    wait_for_latest_delivery_succeeded(&app, &id, "the first delivery").await;
    let event = receiver.hits()[0].event["id"].as_str().unwrap().to_owned();
    let row = payrail::domain::webhook::parse_event_id(&event).unwrap();
    // The API read the endpoint as enabled, then the merchant's disabling committed.
    let r = app
        .post(&format!("/api/v1/webhook_endpoints/{id}"), json!({ "disabled": true }))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let made = app
        .state
        .db
        .redeliver(row, std::slice::from_ref(&id), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(made, 0);
    let pending: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'pending'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pending, 0,
        "a pending delivery on a disabled endpoint is never claimed nor ended"
    );
}

#[actix_web::test]
async fn a_node_keeps_the_leases_of_the_deliveries_waiting_in_its_mailbox() {
    // Leases of 2 s, a slow endpoint taking one POST at a time: deliveries wait in the mailbox
    // for several leases. Another node's claim (made here directly) must find none of them.
    // Room for the eight only, so that this node's own poller claims (at most one at a time)
    // nothing that would hide an expired lease from the other's.
    let app = spawn_app_with(|c| {
        c.webhooks_out.max_queued_total = 8;
        c.webhooks_out.claim_lease_secs = 2;
        c.webhooks_out.timeout_ms = 1_500;
        c.webhooks_out.poll_interval_ms = 50;
        c.webhooks_out.max_in_flight_per_endpoint = 1;
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.delay_ms.store(1_000, Ordering::SeqCst);
    create_endpoint(
        &app,
        json!({ "url": receiver.url, "enabled_events": ["payment.created"] }),
    )
    .await;
    for _ in 0..8 {
        assert_eq!(app.pay(100, "pm_card_visa", "manual", false).await.status, 201);
    }
    wait_for("the first POST", 15, async || !receiver.hits().is_empty()).await;
    let first = Instant::now();
    // Two and a half leases later, most of the eight still wait here.
    while first.elapsed() < Duration::from_millis(5_000) {
        let taken = app
            .state
            .db
            .claim_due_deliveries(100, Duration::from_secs(2), &[])
            .await
            .unwrap();
        assert!(
            taken.is_empty(),
            "another node took {} deliveries this node holds",
            taken.len()
        );
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(receiver.hits().len() < 8, "the test needs deliveries still waiting");
    receiver.delay_ms.store(0, Ordering::SeqCst);
    wait_for("all eight", 30, async || receiver.hits().len() >= 8).await;
}

#[actix_web::test]
async fn an_event_or_delivery_cursor_that_names_no_row_of_the_list_gives_an_empty_page() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let endpoint = create_endpoint(&app, json!({ "url": receiver.url })).await;
    let id = endpoint["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        app.pay(100, "pm_card_visa", "automatic", true).await;
    }
    let other = app.new_merchant().await;
    let pay = json!({ "order_id": "o", "amount": { "value": 100, "currency": "USD" },
                      "payment_method": "pm_card_visa", "capture_strategy": "manual", "confirm": false });
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(&other),
            Some("k-other"),
            Some(&pay.to_string()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let theirs = app.request("GET", "/api/v1/events", Some(&other), None, None).await;
    let their_event = theirs.body["data"][0]["id"].as_str().unwrap().to_owned();
    let page = app.get(&format!("/api/v1/events?starting_after={their_event}")).await;
    assert_eq!(
        (page.status, page.body["data"].clone()),
        (200, json!([])),
        "another merchant's event"
    );
    let page = app.get("/api/v1/events?starting_after=evt_0fffffffffffffff").await;
    assert_eq!(page.body["data"], json!([]), "an event that does not exist");
    let mine = app.get("/api/v1/events").await.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let page = app.get(&format!("/api/v1/events?starting_after={mine}")).await;
    assert!(
        !page.body["data"].as_array().unwrap().is_empty(),
        "its own cursor still pages"
    );

    wait_for("deliveries", 15, async || receiver.hits().len() >= 2).await;
    let log = app.get(&format!("/api/v1/webhook_endpoints/{id}/deliveries")).await;
    let last = log.body["data"][0]["id"].as_str().unwrap().to_owned();
    let page = app
        .get(&format!(
            "/api/v1/webhook_endpoints/{id}/deliveries?starting_after={last}"
        ))
        .await;
    assert!(!page.body["data"].as_array().unwrap().is_empty());
    let page = app
        .get(&format!(
            "/api/v1/webhook_endpoints/{id}/deliveries?starting_after=wd_999999999"
        ))
        .await;
    assert_eq!((page.status, page.body["data"].clone()), (200, json!([])));
}

#[actix_web::test]
async fn concurrent_creations_never_pass_the_bound_on_endpoints() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let other = app.new_merchant().await;
    let body = json!({ "url": receiver.url }).to_string();
    let made = futures_util::future::join_all((0..24).map(|i| {
        let (app, other, body) = (&app, &other, &body);
        async move {
            let key = format!("endpoint-{i}");
            app.request("POST", "/api/v1/webhook_endpoints", Some(other), Some(&key), Some(body))
                .await
                .status
        }
    }))
    .await;
    assert_eq!(made.iter().filter(|s| **s == 201).count(), 16, "{made:?}");
    assert!(made.iter().all(|s| *s == 201 || *s == 400), "{made:?}");
    let listed = app
        .request("GET", "/api/v1/webhook_endpoints", Some(&other), None, None)
        .await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 16);
    // The operators' list says when there are more than it shows.
    let token = app.state.config.admin.token.clone();
    for (limit, more) in [(10, true), (1000, false)] {
        let ops = app
            .request(
                "GET",
                &format!("/admin/v1/webhook_endpoints?limit={limit}"),
                Some(&token),
                None,
                None,
            )
            .await;
        assert_eq!(ops.body["has_more"], more, "limit {limit}");
        if more {
            assert_eq!(ops.body["data"].as_array().unwrap().len(), limit);
        }
    }
}
