//! Orchestration between connectors (docs/API.md, "Connectors" and "Routing"): connectors as
//! data with sealed credentials, routing rules, failover only where nothing reached a PSP, one
//! retry of a soft decline, the circuit breaker, and everything after an authorization going
//! to the connector that authorized.

use serde_json::{json, Value};

use crate::events::{wait_for, wait_for_event_outcome};
use crate::helpers::{spawn_app_with, TestApp, DEMO_KEY};

const KEY: &str = "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

async fn app() -> TestApp {
    spawn_app_with(|c| {
        // The sweeper completes open attempts within a few seconds.
        c.psp.timeout_ms = 1_000;
        c.secrets.key = KEY.into();
        c.routing.breaker.consecutive_failures = 3;
        // Long enough that a loaded machine's payments all fall inside it (at 400 ms, CI on a
        // slow machine saw the breaker half-open, and probing A, between two payments).
        c.routing.breaker.cool_down_ms = 3_000;
        c.routing.cache_ms = 60_000;
        // A currency Stripe counts otherwise than ISO 4217 does.
        c.payments.currencies.push("ISK".into());
    })
    .await
}

/// The demo merchant's id and its own sandbox connector.
async fn demo(app: &TestApp) -> (String, String) {
    let r = app.get("/api/v1/connectors").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = &r.body["data"][0];
    (
        c["merchant_id"].as_str().unwrap().to_owned(),
        c["id"].as_str().unwrap().to_owned(),
    )
}

async fn operator(app: &TestApp, method: &str, path: &str, body: Value) -> crate::helpers::Response {
    let token = app.state.config.admin.token.clone();
    app.request(method, path, Some(&token), None, Some(&body.to_string()))
        .await
}

async fn connector(app: &TestApp, merchant: &str, body: Value) -> Value {
    let r = operator(app, "POST", &format!("/admin/v1/merchants/{merchant}/connectors"), body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn routing(app: &TestApp, merchant: &str, rules: Value) -> Value {
    let r = operator(app, "PUT", &format!("/admin/v1/merchants/{merchant}/routing"), rules).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn pay(
    app: &TestApp,
    amount: i64,
    currency: &str,
    method: &str,
    capture: &str,
    metadata: Value,
) -> crate::helpers::Response {
    app.post(
        "/api/v1/payments",
        json!({ "order_id": "ord_route", "amount": { "value": amount, "currency": currency },
                "payment_method": method, "capture_strategy": capture, "confirm": true, "metadata": metadata }),
    )
    .await
}

async fn attempts(app: &TestApp, payment: &str) -> Vec<(String, String, Option<String>)> {
    app.sql()
        .await
        .query(
            "SELECT operation, coalesce(connector_id, ''), outcome FROM psp_attempts WHERE payment_id = $1
             ORDER BY started_at, id",
            &[&payment],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn att(op: &str, connector: &str, outcome: Option<&str>) -> (String, String, Option<String>) {
    (op.into(), connector.into(), outcome.map(str::to_owned))
}

async fn outage(app: &TestApp, connector: &str, on: bool) {
    let r = app
        .post(
            &format!("/sandbox/v1/connectors/{connector}/outage"),
            json!({ "enabled": on }),
        )
        .await;
    assert_eq!((r.status, r.body["outage"].as_bool()), (200, Some(on)), "{}", r.body);
}

#[actix_web::test]
async fn connectors_keep_their_credentials_sealed_and_are_made_once_per_id() {
    let app = app().await;
    let (merchant, own) = demo(&app).await;
    let secret = "whsec_connector_b_only_secret_value";
    let b = connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_test_b", "psp": "sandbox", "label": "B", "currencies": ["USD", "EUR"],
                "settings": { "latency_ms": 5 }, "credentials": { "webhook_secret": secret } }),
    )
    .await;
    assert_eq!(
        (b["id"].as_str(), b["has_credentials"].as_bool(), b["enabled"].as_bool()),
        (Some("mca_test_b"), Some(true), Some(true))
    );
    assert_eq!(b["webhook_url_path"], "/internal/webhooks/psp/sandbox/mca_test_b");
    assert!(!b.to_string().contains(secret), "never returned");
    // Sealed at rest: the bytes stored do not hold the secret.
    let stored: Vec<u8> = app
        .sql()
        .await
        .query_one("SELECT credentials FROM connectors WHERE id = 'mca_test_b'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.len() > 28 && !stored.windows(secret.len()).any(|w| w == secret.as_bytes()));
    // The same id again: 200, as stored; on another merchant: 409.
    let token = app.state.config.admin.token.clone();
    let again = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "connector_id": "mca_test_b", "psp": "sandbox", "label": "renamed?" }),
    )
    .await;
    assert_eq!((again.status, again.body["label"].as_str()), (200, Some("B")));
    let other = app.new_merchant().await;
    let other_id = app
        .request("GET", "/api/v1/connectors", Some(&other), None, None)
        .await
        .body["data"][0]["merchant_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let taken = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{other_id}/connectors"),
        json!({ "connector_id": "mca_test_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    assert_eq!(
        (taken.status, taken.body["error"]["code"].as_str()),
        (409, Some("connector_id_taken"))
    );
    // What a PSP cannot work without is named.
    let adyen = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "psp": "adyen", "label": "A", "credentials": { "api_key": "k" } }),
    )
    .await;
    assert_eq!(
        (adyen.status, adyen.body["error"]["param"].as_str()),
        (400, Some("credentials.merchant_account"))
    );
    let stripe = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "psp": "stripe", "label": "S", "credentials": { "webhook_secret": "w" } }),
    )
    .await;
    assert_eq!(
        (stripe.status, stripe.body["error"]["param"].as_str()),
        (400, Some("credentials.api_key"))
    );
    let plain_http = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "psp": "stripe", "label": "S", "credentials": { "api_key": "sk_x", "api_base": "http://stripe.example" } }),
    )
    .await;
    assert_eq!(
        (plain_http.status, plain_http.body["error"]["param"].as_str()),
        (400, Some("credentials.api_base"))
    );
    let bad = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "psp": "sandbox", "label": "S", "credentials": { "api_key": "nope" } }),
    )
    .await;
    assert_eq!(
        (bad.status, bad.body["error"]["param"].as_str()),
        (400, Some("credentials"))
    );
    assert!(
        !bad.raw.windows(4).any(|w| w == b"nope"),
        "a credential is never echoed"
    );
    let r = app
        .request(
            "GET",
            &format!("/admin/v1/merchants/{merchant}/connectors"),
            Some(&token),
            None,
            None,
        )
        .await;
    let ids: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [own.as_str(), "mca_test_b"], "oldest first");
    // An update changes what it names; credentials are replaced whole.
    let r = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors/mca_test_b"),
        json!({ "enabled": false, "label": "B2" }),
    )
    .await;
    assert_eq!(
        (
            r.status,
            r.body["enabled"].as_bool(),
            r.body["label"].as_str(),
            r.body["currencies"].clone()
        ),
        (200, Some(false), Some("B2"), json!(["USD", "EUR"]))
    );
    let r = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{other_id}/connectors/mca_test_b"),
        json!({ "enabled": true }),
    )
    .await;
    assert_eq!(r.status, 404, "another merchant's connector");

    // The connector's own webhook URL is verified with its own secret, not the global one.
    let event = json!({ "id": "evt_conn_b_1", "type": "payment_intent.succeeded",
                        "data": { "object": { "id": "pi_unknown_to_payrail", "amount": 100 } } })
    .to_string();
    let post = |secret: String, body: String| {
        let app = &app;
        async move {
            let t = chrono::Utc::now().timestamp();
            let sig = payrail::adapters::psp::signature::sign_stripe(body.as_bytes(), &secret, t);
            app.client
                .post(format!("{}/internal/webhooks/psp/sandbox/mca_test_b", app.address))
                .insert_header(("Stripe-Signature", sig))
                .insert_header(("Content-Type", "application/json"))
                .send_body(body)
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post(app.state.config.webhooks.secret.clone(), event.clone()).await, 400);
    assert_eq!(post(secret.to_owned(), event.clone()).await, 200);
    // A merchant's connector secret does not reach another merchant's payments: an event it
    // signed about one is dropped, never applied.
    let theirs = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(&other),
            Some("k-other-pay"),
            Some(r#"{"order_id":"o","amount":{"value":700,"currency":"USD"},"payment_method":"pm_card_visa","capture_strategy":"manual","confirm":true}"#),
        )
        .await;
    assert_eq!(theirs.body["status"], "authorized", "{}", theirs.body);
    let pi = theirs.body["psp_reference"].as_str().unwrap();
    let forged = json!({ "id": "evt_forged_cancel", "type": "payment_intent.canceled",
                         "data": { "object": { "id": pi, "status": "canceled" } } })
    .to_string();
    assert_eq!(post(secret.to_owned(), forged).await, 200);
    wait_for_event_outcome(&app, "foreign").await;
    let id = theirs.body["payment_id"].as_str().unwrap();
    let still = app
        .request("GET", &format!("/api/v1/payments/{id}"), Some(&other), None, None)
        .await;
    assert_eq!(still.body["status"], "authorized");
    // Another PSP's path for this connector is not its URL.
    let r = app
        .client
        .post(format!("{}/internal/webhooks/psp/adyen/mca_test_b", app.address))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[actix_web::test]
async fn without_a_secrets_key_no_credential_is_stored() {
    let app = spawn_app_with(|c| c.secrets.key = String::new()).await;
    let (merchant, _) = demo(&app).await;
    let r = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors"),
        json!({ "psp": "sandbox", "label": "S", "credentials": { "webhook_secret": "whsec_x" } }),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("secrets_not_configured"))
    );
    assert_eq!(app.count("connectors").await, 1);
}

#[actix_web::test]
async fn rules_choose_the_connector_and_the_payment_says_which_and_why() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_eur", "psp": "sandbox", "label": "EUR only", "currencies": ["EUR"] }),
    )
    .await;
    let r = routing(
        &app,
        &merchant,
        json!({ "rules": [
            { "name": "big", "when": { "amount_gte": 100000 }, "connector": "mca_b" },
            { "name": "mastercard", "when": { "card_brand": ["mastercard"] }, "connector": "mca_b" },
            { "name": "vip", "when": { "metadata": { "tier": "vip" } }, "split": [
                { "connector": a, "weight": 1 }, { "connector": "mca_b", "weight": 1 } ] } ],
          "default": [a] }),
    )
    .await;
    assert_eq!(r["version"], 1);
    // The same rules again: the same version.
    let again = routing(&app, &merchant, json!({ "rules": r["rules"], "default": r["default"] })).await;
    assert_eq!(again["version"], 1);

    let cases = [
        (150_000, "USD", "pm_card_visa", json!({}), "mca_b", "big"),
        (1_000, "USD", "pm_card_mastercard", json!({}), "mca_b", "mastercard"),
        (1_000, "USD", "pm_card_visa", json!({}), a.as_str(), "default"),
    ];
    for (amount, cur, pm, meta, want, rule) in cases {
        let p = pay(&app, amount, cur, pm, "automatic", meta).await;
        assert_eq!(p.status, 201, "{}", p.body);
        assert_eq!(
            (
                p.body["status"].as_str(),
                p.body["routing"]["connector_id"].as_str(),
                p.body["routing"]["rule"].as_str()
            ),
            (Some("captured"), Some(want), Some(rule)),
            "{}",
            p.body
        );
        let id = p.body["payment_id"].as_str().unwrap();
        assert_eq!(p.body["attempts"][0]["connector_id"], want);
        assert_eq!(p.body["attempts"][0]["outcome"], "succeeded");
        assert_eq!(attempts(&app, id).await, [att("authorize", want, Some("succeeded"))]);
    }
    // A weighted split: both connectors get payments, each payment one.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let p = pay(&app, 500, "USD", "pm_card_visa", "automatic", json!({ "tier": "vip" })).await;
        assert_eq!(p.body["routing"]["rule"], "vip");
        seen.insert(p.body["routing"]["connector_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // EUR: the default connector takes every currency; the EUR-only one is eligible too.
    let p = pay(&app, 500, "EUR", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(p.body["routing"]["connector_id"], a.as_str());

    // Rules that name what does not exist are refused with the field.
    let r = operator(
        &app,
        "PUT",
        &format!("/admin/v1/merchants/{merchant}/routing"),
        json!({ "rules": [{ "name": "x", "connector": "mca_nope" }] }),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["param"].as_str()),
        (400, Some("rules[0].connector"))
    );
    let r = operator(
        &app,
        "PUT",
        &format!("/admin/v1/merchants/{merchant}/routing"),
        json!({ "rulez": [] }),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Only enabled connectors that take the currency: with A taking USD only and B disabled,
    // GBP has none.
    operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors/{a}"),
        json!({ "currencies": ["USD"] }),
    )
    .await;
    operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors/mca_b"),
        json!({ "enabled": false }),
    )
    .await;
    let p = pay(&app, 500, "GBP", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(
        (p.status, p.body["error"]["code"].as_str()),
        (400, Some("no_eligible_connector")),
        "{}",
        p.body
    );
    // A default list is the whole list: a connector it does not name is not tried.
    let p = pay(&app, 500, "EUR", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(p.body["error"]["code"], "no_eligible_connector", "{}", p.body);
    routing(&app, &merchant, json!({ "default": [a, "mca_eur"] })).await;
    let p = pay(&app, 500, "EUR", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(p.body["routing"]["connector_id"], "mca_eur", "{}", p.body);
}

#[actix_web::test]
async fn an_outage_fails_over_and_the_breaker_opens_then_closes() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": [a, "mca_b"] })).await;
    outage(&app, &a, true).await;
    for i in 0..5 {
        let p = pay(&app, 1_000 + i, "USD", "pm_card_visa", "automatic", json!({})).await;
        assert_eq!(
            (
                p.status,
                p.body["status"].as_str(),
                p.body["routing"]["connector_id"].as_str()
            ),
            (201, Some("captured"), Some("mca_b")),
            "{}",
            p.body
        );
        let id = p.body["payment_id"].as_str().unwrap();
        if i < 3 {
            assert_eq!(
                attempts(&app, id).await,
                [
                    att("authorize", &a, Some("unreachable")),
                    att("authorize", "mca_b", Some("succeeded"))
                ]
            );
            assert_eq!(p.body["attempts"][0]["outcome"], "unreachable");
            assert_eq!(p.body["attempts"].as_array().unwrap().len(), 2);
        } else {
            // A's breaker opened at the third failure: routing puts A last, so later payments
            // go to B straight away, with no attempt on A.
            assert_eq!(attempts(&app, id).await, [att("authorize", "mca_b", Some("succeeded"))]);
        }
    }
    // Three failures in a row opened A's breaker: the calls after it did not try A at all.
    let token = app.state.config.admin.token.clone();
    let health = app
        .request("GET", "/admin/v1/connectors", Some(&token), None, None)
        .await;
    let a_health = health.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == a.as_str())
        .unwrap()
        .clone();
    // Open, or half-open should the cool-down have passed since (no probe has gone to A yet
    // either way).
    assert!(
        matches!(a_health["breaker"].as_str(), Some("open" | "half_open")) && a_health["outage"] == true,
        "{a_health}"
    );
    assert_eq!(a_health["breaker_opened"], 1);
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains("payrail_psp_breakers_open{psp=\"sandbox\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("payrail_psp_failovers_total{reason=\"unreachable\"} 3"),
        "{metrics}"
    );

    // Back from the outage: after the cool-down one probe goes to A, and it closes the breaker.
    outage(&app, &a, false).await;
    wait_for("the breaker to close", async || {
        let p = pay(&app, 700, "USD", "pm_card_visa", "automatic", json!({})).await;
        p.body["routing"]["connector_id"] == a.as_str()
    })
    .await;
    let health = app
        .request("GET", "/admin/v1/connectors", Some(&token), None, None)
        .await;
    let a_health = health.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == a.as_str())
        .unwrap()
        .clone();
    assert_eq!(a_health["breaker"], "closed");
    // With every connector down, nothing is charged and the confirm can be made again.
    outage(&app, &a, true).await;
    outage(&app, "mca_b", true).await;
    let body = json!({ "order_id": "ord_down", "amount": { "value": 900, "currency": "USD" },
                       "payment_method": "pm_card_visa", "confirm": true })
    .to_string();
    let p = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("k-all-down"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (p.status, p.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        p.body
    );
    let pending: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM psp_attempts WHERE outcome IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0, "an attempt that reached no PSP is closed");
    // The same request again, once a connector is back: it is routed again and goes through
    // (a key whose attempts reached no PSP did nothing to replay).
    outage(&app, "mca_b", false).await;
    let again = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("k-all-down"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (
            again.status,
            again.body["status"].as_str(),
            again.body["routing"]["connector_id"].as_str()
        ),
        (201, Some("captured"), Some("mca_b")),
        "{}",
        again.body
    );
    let twice: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM (SELECT payment_id FROM psp_attempts WHERE operation = 'authorize'
               AND outcome = 'succeeded' GROUP BY payment_id HAVING count(*) > 1) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 0, "no payment authorized twice");
}

#[actix_web::test]
async fn a_soft_decline_is_retried_once_elsewhere_and_a_hard_one_never() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    // Alone, a soft decline is the payment's answer.
    let p = pay(
        &app,
        1_000,
        "USD",
        "pm_card_chargeDeclinedProcessingError",
        "automatic",
        json!({}),
    )
    .await;
    assert_eq!(
        (p.body["status"].as_str(), p.body["failure"]["decline_code"].as_str()),
        (Some("failed"), Some("processing_error")),
        "{}",
        p.body
    );
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": [a, "mca_b"] })).await;
    let p = pay(
        &app,
        1_000,
        "USD",
        "pm_card_chargeDeclinedProcessingError",
        "automatic",
        json!({}),
    )
    .await;
    assert_eq!(
        (p.body["status"].as_str(), p.body["routing"]["connector_id"].as_str()),
        (Some("captured"), Some("mca_b")),
        "{}",
        p.body
    );
    let id = p.body["payment_id"].as_str().unwrap();
    assert_eq!(
        attempts(&app, id).await,
        [
            att("authorize", &a, Some("failed")),
            att("authorize", "mca_b", Some("succeeded"))
        ]
    );
    assert_eq!(p.body["attempts"][0]["failure_code"], "processing_error");
    assert_eq!(p.body["failure"], Value::Null, "the payment did not fail");
    // The declined intent's own event finds the payment through its attempt, and is recorded
    // without changing it (never a dead letter, never a failed payment).
    wait_for("the declined intent's event", async || {
        app.sql()
            .await
            .query_opt(
                "SELECT 1 FROM processed_events WHERE payment_id = $1 AND event_type = 'payment_intent.payment_failed'",
                &[&id],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    assert_eq!(app.count("dead_letters").await, 0);
    assert_eq!(
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"],
        "captured"
    );
    // A hard decline stays declined, on the first connector only.
    let p = pay(&app, 1_000, "USD", "pm_card_chargeDeclined", "automatic", json!({})).await;
    assert_eq!(p.body["status"], "failed");
    let id = p.body["payment_id"].as_str().unwrap();
    assert_eq!(attempts(&app, id).await, [att("authorize", &a, Some("failed"))]);
}

#[actix_web::test]
async fn a_timeout_after_sending_is_never_failed_over() {
    let app = spawn_app_with(|c| {
        c.psp.timeout_ms = 150;
        c.routing.cache_ms = 60_000;
    })
    .await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": [a, "mca_b"] })).await;
    // A answers after payrail stopped waiting: it may have charged.
    let r = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors/{a}"),
        json!({ "settings": { "latency_ms": 600 } }),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = json!({ "order_id": "ord_t", "amount": { "value": 2_500, "currency": "USD" },
                       "payment_method": "pm_card_visa", "confirm": true })
    .to_string();
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("k-timeout"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    let id: String = app
        .sql()
        .await
        .query_one(
            "SELECT payment_id FROM psp_attempts ORDER BY started_at DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempts(&app, &id).await,
        [att("authorize", &a, None)],
        "left open on A, B never asked"
    );
    // The retry with the same key completes the same attempt, on A.
    let r = operator(
        &app,
        "POST",
        &format!("/admin/v1/merchants/{merchant}/connectors/{a}"),
        json!({ "settings": {} }),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("k-timeout"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["status"].as_str(),
            r.body["routing"]["connector_id"].as_str()
        ),
        (201, Some("captured"), Some(a.as_str())),
        "{}",
        r.body
    );
    assert_eq!(attempts(&app, &id).await, [att("authorize", &a, Some("succeeded"))]);
}

#[actix_web::test]
async fn capture_refund_and_cancel_go_to_the_connector_that_authorized() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_b", "psp": "sandbox", "label": "B" }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": ["mca_b", a] })).await;
    let p = pay(&app, 5_000, "USD", "pm_card_visa", "manual", json!({})).await;
    let paid = p.body["payment_id"].as_str().unwrap().to_owned();
    let p2 = pay(&app, 3_000, "USD", "pm_card_visa", "manual", json!({})).await;
    let canceled = p2.body["payment_id"].as_str().unwrap().to_owned();
    assert_eq!(p.body["routing"]["connector_id"], "mca_b");
    // The merchant's routing moves to A, and B goes down: B's payments still go to B.
    routing(&app, &merchant, json!({ "default": [a] })).await;
    let r = app
        .post(
            &format!("/api/v1/payments/{paid}/capture"),
            json!({ "amount": { "value": 4_000, "currency": "USD" } }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        r.body
    );
    let r = app
        .post(
            &format!("/api/v1/payments/{paid}/refunds"),
            json!({ "amount": { "value": 1_000, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app
        .post(&format!("/api/v1/payments/{canceled}/cancel"), json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        r.body
    );
    assert_eq!(
        attempts(&app, &paid).await,
        [
            att("authorize", "mca_b", Some("succeeded")),
            att("capture", "mca_b", Some("succeeded")),
            att("refund", "mca_b", Some("succeeded"))
        ]
    );
    // The payment object lists every attempt with its operation and connector.
    let listed = app.get(&format!("/api/v1/payments/{paid}")).await.body["attempts"].clone();
    let listed: Vec<(&str, &str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["operation"].as_str().unwrap(),
                a["connector_id"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("authorize", "mca_b", "succeeded"),
            ("capture", "mca_b", "succeeded"),
            ("refund", "mca_b", "succeeded")
        ]
    );
    assert_eq!(
        attempts(&app, &canceled).await[1],
        att("cancel", "mca_b", Some("succeeded"))
    );
    // B in an outage: a capture waits for B (503, the attempt stays open), never goes to A.
    routing(&app, &merchant, json!({ "default": ["mca_b", a] })).await;
    let p5 = pay(&app, 2_000, "USD", "pm_card_visa", "manual", json!({})).await;
    let on_b = p5.body["payment_id"].as_str().unwrap().to_owned();
    assert_eq!(p5.body["routing"]["connector_id"], "mca_b");
    outage(&app, "mca_b", true).await;
    let r = app.post(&format!("/api/v1/payments/{on_b}/capture"), json!({})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        attempts(&app, &on_b).await,
        [
            att("authorize", "mca_b", Some("succeeded")),
            att("capture", "mca_b", None)
        ]
    );
    outage(&app, "mca_b", false).await;
    wait_for("the open capture to complete on B", async || {
        app.get(&format!("/api/v1/payments/{on_b}")).await.body["status"] == "captured"
    })
    .await;
}

#[actix_web::test]
async fn a_connector_that_cannot_be_made_is_skipped_not_tried() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_stripe_broken", "psp": "stripe", "label": "S",
                "credentials": { "api_key": "sk_test_x" } }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": ["mca_stripe_broken", a] })).await;
    // Its sealed credentials no longer open (a key changed, a row copied by hand).
    app.sql()
        .await
        .execute(
            "UPDATE connectors SET credentials = decode('00112233445566778899aabbccddeeff00112233445566778899', 'hex'),
                updated_at = now() WHERE id = 'mca_stripe_broken'",
            &[],
        )
        .await
        .unwrap();
    for i in 0..3 {
        let p = pay(&app, 1_000 + i, "USD", "pm_card_visa", "automatic", json!({})).await;
        assert_eq!(
            (p.status, p.body["routing"]["connector_id"].as_str()),
            (201, Some(a.as_str())),
            "{}",
            p.body
        );
        let id = p.body["payment_id"].as_str().unwrap();
        assert_eq!(attempts(&app, id).await, [att("authorize", &a, Some("succeeded"))]);
    }
}

/// A PSP that counts a currency in other units than ISO 4217 is never given a payment in it:
/// Stripe reads ISK with two decimals, so an ISK payment goes to the next connector, while a USD
/// one is sent to Stripe first (here unreachable, so it fails over, an attempt recorded).
#[actix_web::test]
async fn a_connector_whose_psp_counts_a_currency_otherwise_is_not_given_it() {
    let app = app().await;
    let (merchant, a) = demo(&app).await;
    connector(
        &app,
        &merchant,
        json!({ "connector_id": "mca_stripe_units", "psp": "stripe", "label": "S",
                "credentials": { "api_key": "sk_test_x", "api_base": "http://127.0.0.1:9" } }),
    )
    .await;
    routing(&app, &merchant, json!({ "default": ["mca_stripe_units", a] })).await;
    let isk = pay(&app, 5_000, "ISK", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(
        (isk.status, isk.body["routing"]["connector_id"].as_str()),
        (201, Some(a.as_str())),
        "{}",
        isk.body
    );
    let id = isk.body["payment_id"].as_str().unwrap();
    assert_eq!(attempts(&app, id).await, [att("authorize", &a, Some("succeeded"))]);
    let usd = pay(&app, 5_000, "USD", "pm_card_visa", "automatic", json!({})).await;
    assert_eq!(
        (usd.status, usd.body["routing"]["connector_id"].as_str()),
        (201, Some(a.as_str())),
        "{}",
        usd.body
    );
    let id = usd.body["payment_id"].as_str().unwrap();
    assert_eq!(
        attempts(&app, id).await,
        [
            att("authorize", "mca_stripe_units", Some("unreachable")),
            att("authorize", &a, Some("succeeded"))
        ]
    );
}

/// Stripe keeps an idempotency key's answer for 24 hours: an attempt open longer than that is
/// never sent again (the same key would be a new request there), and says so in `/metrics`.
#[actix_web::test]
async fn an_open_stripe_attempt_past_stripes_key_window_is_not_sent_again() {
    let first = app().await;
    let (merchant, _) = demo(&first).await;
    let dead = format!("http://127.0.0.1:{}", crate::helpers::free_port());
    connector(
        &first,
        &merchant,
        json!({ "connector_id": "mca_stripe_old", "psp": "stripe", "label": "S",
                "credentials": { "api_key": "sk_test_old", "api_base": dead } }),
    )
    .await;
    let p = pay(&first, 2_000, "USD", "pm_card_visa", "manual", json!({})).await;
    let id = p.body["payment_id"].as_str().unwrap().to_owned();
    // As if it had been authorized at Stripe and its capture left open for 25 hours.
    let db = first.sql().await;
    db.execute(
        "UPDATE payments SET psp = 'stripe', version = version + 1,
            routing = jsonb_set(routing, '{connector_id}', '\"mca_stripe_old\"') WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO psp_attempts (id, payment_id, operation, amount, started_at, connector_id)
         VALUES ('att_0000000000000000000000000000old1', $1, 'capture', 2000, now() - interval '25 hours', 'mca_stripe_old')",
        &[&id],
    )
    .await
    .unwrap();
    // A fresh process reads the payment from the store.
    first.stop().await.unwrap();
    let url = first.database_url.clone();
    let second = spawn_app_with(move |c| {
        c.database.url = url;
        c.secrets.key = KEY.into();
    })
    .await;
    let r = second.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    let metrics = second
        .client
        .get(format!("{}/metrics", second.address))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("code=\"idempotency_window_passed\""), "{metrics}");
    assert!(
        !metrics.contains("psp=\"stripe\",code=\"not_sent\"") && !metrics.contains("code=\"not_sent\",psp=\"stripe\""),
        "never sent"
    );
    let open: i64 = db
        .query_one(
            "SELECT count(*) FROM psp_attempts WHERE payment_id = $1 AND outcome IS NULL",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 1, "left open for an operator");
}

/// A PSP event for a payment whose earlier attempt is still open while the PSP's API times out:
/// the event waits (the attempt must be resolved first), delivered again and again past
/// `max_deliver`, and is never parked as a dead letter for it; once the API answers, it applies.
#[actix_web::test]
async fn an_event_waiting_for_the_psps_api_is_never_parked_for_it() {
    let app = spawn_app_with(|c| c.psp.timeout_ms = 150).await;
    let (merchant, a) = demo(&app).await;
    let path = format!("/admin/v1/merchants/{merchant}/connectors/{a}");
    let slow = |ms: u64| operator(&app, "POST", &path, json!({ "settings": { "latency_ms": ms } }));
    let p = pay(&app, 2_500, "USD", "pm_card_visa", "manual", json!({})).await;
    let id = p.body["payment_id"].as_str().unwrap().to_owned();
    let reference = p.body["psp_reference"].as_str().unwrap().to_owned();
    // The capture's call times out: its attempt stays open.
    assert_eq!(slow(600).await.status, 200);
    let r = app.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    // An event for the payment: every delivery meets the open attempt, whose resend times out.
    let object = json!({ "id": reference, "amount_received": 2_500, "currency": "usd" });
    assert_eq!(
        crate::events::send_event(&app, "evt_waits", "payment_intent.succeeded", object).await,
        200
    );
    let waited = async || -> u64 {
        let m = app.request("GET", "/metrics", None, None, None).await;
        String::from_utf8_lossy(&m.raw)
            .lines()
            .find(|l| l.starts_with("payrail_psp_events_total") && l.contains("outcome=\"waiting\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while waited().await <= app.state.config.nats.max_deliver as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the event was not delivered past max_deliver"
        );
        actix_rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let token = app.state.config.admin.token.clone();
    let parked = app
        .request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
        .await;
    assert_eq!(parked.body["total"], 0, "{}", parked.body);
    // Each wait's age is observed: operators see how long events have been held up.
    let m = app.request("GET", "/metrics", None, None, None).await;
    let metrics = String::from_utf8_lossy(&m.raw);
    let ages: u64 = metrics
        .lines()
        .find(|l| l.starts_with("payrail_psp_event_waiting_age_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(ages >= app.state.config.nats.max_deliver as u64, "{metrics}");
    let sum: f64 = metrics
        .lines()
        .find(|l| l.starts_with("payrail_psp_event_waiting_age_seconds_sum"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    // Ages in seconds since the event was published, within this test's minute.
    assert!(sum > 0.0 && sum < ages as f64 * 60.0, "{sum} over {ages}");
    // The API answers again: the capture is resolved, and the event is taken.
    assert_eq!(slow(0).await.status, 200);
    wait_for("the payment to be captured", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == "captured"
    })
    .await;
    wait_for("the event to be taken", async || {
        app.sql()
            .await
            .query_one(
                "SELECT count(*) FROM processed_events WHERE event_id = 'evt_waits'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
}
