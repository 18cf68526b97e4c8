//! Malformed requests are 4xx with nothing stored, no input echoed, and the server healthy.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, DEMO_KEY};

fn create(amount: Value, currency: Value) -> String {
    json!({ "order_id": "ord_1", "amount": { "value": amount, "currency": currency }, "payment_method": "pm_card_visa" }).to_string()
}

#[actix_web::test]
async fn malformed_create_requests_are_rejected_and_store_nothing() {
    let app = spawn_app().await;
    let metadata: serde_json::Map<String, Value> = (0..60).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad json", r#"{"order_id": "#.into(), "body_invalid"),
        ("not an object", "[1, 2, 3]".into(), "body_invalid"),
        ("wrong type", r#"{"order_id": 12, "amount": {"value": 1, "currency": "USD"}, "payment_method": "pm_card_visa"}"#.into(), "parameter_invalid"),
        ("negative", create(json!(-5), json!("USD")), "amount_invalid"),
        ("zero", create(json!(0), json!("USD")), "amount_invalid"),
        ("float", create(json!(10.5), json!("USD")), "amount_invalid"),
        ("2^63", create(json!(9_223_372_036_854_775_808u64), json!("USD")), "amount_invalid"),
        ("10^30", r#"{"order_id":"o","amount":{"value":1000000000000000000000000000000,"currency":"USD"},"payment_method":"pm_card_visa"}"#.into(), "amount_invalid"),
        ("over the limit", create(json!(100_000_000_000i64), json!("USD")), "amount_invalid"),
        ("string amount", create(json!("100"), json!("USD")), "amount_invalid"),
        ("unknown currency", create(json!(100), json!("XYZ")), "currency_invalid"),
        ("lower-case currency", create(json!(100), json!("usd")), "currency_invalid"),
        ("not configured currency", create(json!(100), json!("SEK")), "currency_invalid"),
        ("raw card number", r#"{"order_id":"o","amount":{"value":100,"currency":"USD"},"payment_method":"4242424242424242"}"#.into(), "payment_method_invalid"),
        ("card number with spaces", r#"{"order_id":"o","amount":{"value":100,"currency":"USD"},"payment_method":"4242 4242 4242 4242"}"#.into(), "payment_method_invalid"),
        ("card number in metadata", r#"{"order_id":"o","amount":{"value":100,"currency":"USD"},"payment_method":"pm_card_visa","metadata":{"note":"4000000000000002"}}"#.into(), "card_data_not_allowed"),
        ("60 metadata keys", json!({ "order_id": "o", "amount": { "value": 100, "currency": "USD" }, "payment_method": "pm_card_visa", "metadata": metadata }).to_string(), "parameter_invalid"),
        ("missing order_id", r#"{"amount":{"value":100,"currency":"USD"},"payment_method":"pm_card_visa"}"#.into(), "parameter_missing"),
        ("long order_id", json!({ "order_id": "o".repeat(65), "amount": { "value": 100, "currency": "USD" }, "payment_method": "pm_card_visa" }).to_string(), "parameter_invalid"),
        ("unknown parameter", r#"{"order_id":"o","amount":{"value":100,"currency":"USD"},"payment_method":"pm_card_visa","amount_cents":5}"#.into(), "parameter_unknown"),
        ("bad capture strategy", r#"{"order_id":"o","amount":{"value":100,"currency":"USD"},"payment_method":"pm_card_visa","capture_strategy":"later"}"#.into(), "parameter_invalid"),
    ];
    for (i, (name, body, code)) in cases.iter().enumerate() {
        let r = app
            .request(
                "POST",
                "/api/v1/payments",
                Some(DEMO_KEY),
                Some(&format!("v{i}")),
                Some(body),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some(*code)),
            "{name}: {}",
            r.body
        );
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        let text = String::from_utf8_lossy(&r.raw);
        assert!(
            !text.contains("4242") && !text.contains("4000000000000002"),
            "{name} echoed card data: {text}"
        );
    }
    // A 1 MB body is refused as too large.
    let huge = format!(r#"{{"order_id":"o","description":"{}"}}"#, "x".repeat(1 << 20));
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("huge"), Some(&huge))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    assert_eq!(app.count("payments").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    assert_eq!(app.request("GET", "/healthz", None, None, None).await.status, 200);
    assert_eq!(app.request("GET", "/readyz", None, None, None).await.status, 200);
    // And it still takes payments.
    assert_eq!(app.pay(100, "pm_card_visa", "automatic", true).await.status, 201);
}

#[actix_web::test]
async fn malformed_operation_bodies_and_ids_are_rejected() {
    let app = spawn_app().await;
    let p = app.pay(1000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let capture = format!("/api/v1/payments/{p}/capture");
    for (body, code) in [
        (r#"{"amount":{"value":1001,"currency":"USD"}}"#, "amount_too_large"),
        (r#"{"amount":{"value":100,"currency":"EUR"}}"#, "parameter_invalid"),
        (r#"{"amount":{"value":-1,"currency":"USD"}}"#, "amount_invalid"),
        (r#"{"amount":100}"#, "parameter_invalid"),
        ("not json", "body_invalid"),
    ] {
        let r = app.post_raw(&capture, body).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {}",
            r.body
        );
    }
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"],
        "authorized"
    );
    for bad in ["pay_", "pay_x'y", "re_123", "nothing"] {
        assert_eq!(app.get(&format!("/api/v1/payments/{bad}")).await.status, 404, "{bad}");
        assert_eq!(
            app.post_raw(&format!("/api/v1/payments/{bad}/capture"), "{}")
                .await
                .status,
            404,
            "{bad}"
        );
    }
    assert_eq!(
        app.get(&format!("/api/v1/payments/pay_{}", "0".repeat(32)))
            .await
            .status,
        404
    );
    let unknown = app.get("/api/v1/nothing-here").await;
    assert_eq!(
        (unknown.status, unknown.body["error"]["code"].as_str()),
        (404, Some("resource_missing"))
    );
}

#[actix_web::test]
async fn an_undeclared_method_on_a_real_path_is_405_with_allow() {
    let app = spawn_app().await;
    let r = app
        .request("PUT", "/api/v1/payments", Some(DEMO_KEY), None, Some("{}"))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let allow = r.headers.get("allow").unwrap().to_str().unwrap().to_owned();
    assert_eq!(allow, "POST, GET");
    let r = app
        .request("DELETE", "/api/v1/payments/pay_abc", Some(DEMO_KEY), None, None)
        .await;
    assert_eq!(
        (r.status, r.headers.get("allow").unwrap().to_str().unwrap()),
        (405, "GET")
    );
    assert_eq!(
        app.request("GET", "/api/v1/payments/pay_abc/nothing", Some(DEMO_KEY), None, None)
            .await
            .status,
        404
    );
}

#[actix_web::test]
async fn nul_characters_are_400_not_500() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "o", "amount": { "value": 100, "currency": "USD" }, "payment_method": "pm_card_visa",
                       "description": "a\u{0}b" });
    let r = app.post("/api/v1/payments", body).await;
    assert_eq!(
        (r.status, r.body["error"]["param"].as_str()),
        (400, Some("description"))
    );
    assert_eq!(app.count("payments").await, 0);
}

/// What schemathesis found: NULs, control characters and out-of-range times are 400s and
/// 404s at the door, never a 500 or a panic, and nothing they carry is published.
#[actix_web::test]
async fn nul_bytes_control_characters_and_far_times_are_refused_at_the_door() {
    let app = spawn_app().await;
    let get = |path: &'static str| app.request("GET", path, Some(DEMO_KEY), None, None);
    assert_eq!(get("/api/v1/payments?order_id=a%00b").await.status, 400);
    assert_eq!(get("/api/v1/payments?created_gte=-210866803201").await.status, 400);
    assert_eq!(get("/api/v1/payments?created_lt=99999999999999").await.status, 400);
    assert_eq!(get("/api/v1/payments?created_gte=-62135596800").await.status, 200);
    assert_eq!(
        app.request(
            "POST",
            "/sandbox/v1/payments/a%00b/complete_3ds",
            Some(DEMO_KEY),
            None,
            None
        )
        .await
        .status,
        404
    );
    assert_eq!(
        app.request("DELETE", "/api/v1/risk/rules/rr_a%00b", Some(DEMO_KEY), None, None)
            .await
            .status,
        404
    );
    for (id, reference) in [
        ("evt_a\nb", "pi_1"),
        ("evt_a\rb", "pi_1"),
        ("evt_\u{0}", "pi_1"),
        ("evt_ok", "pi_\u{0}"),
    ] {
        let object = json!({ "id": reference, "object": "payment_intent", "amount": 100 });
        let status = crate::events::send_event(&app, id, "payment_intent.succeeded", object).await;
        assert_eq!(status, 400, "{id:?} {reference:?}");
    }
    let stream = async_nats::jetstream::new(app.state.nats.client.clone())
        .get_stream(format!("{}_PSP_EVENTS", app.state.config.nats.stream_prefix))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    // Nothing was ever published (a work queue deletes what was acknowledged: not `messages`).
    assert_eq!(stream, 0, "nothing was published");
}
