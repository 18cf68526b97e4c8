//! A payment's whole life against the sandbox PSP: every outcome of docs/API.md's test cards.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

fn id(r: &Value) -> String {
    r["payment_id"].as_str().expect("payment_id").to_owned()
}

/// Σ debit = Σ credit in every journal of the payment; returns the journals.
async fn balanced_journals(app: &TestApp, payment: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/ledger/journals?payment_id={payment}")).await;
    assert_eq!(r.status, 200);
    let journals = r.body["data"].as_array().unwrap().clone();
    for j in &journals {
        let entries = j["entries"].as_array().unwrap();
        let d: i64 = entries.iter().map(|e| e["debit"].as_i64().unwrap()).sum();
        let c: i64 = entries.iter().map(|e| e["credit"].as_i64().unwrap()).sum();
        assert_eq!(d, c, "{j}");
    }
    journals
}

#[actix_web::test]
async fn manual_capture_partial_capture_and_refunds_up_to_the_captured_amount() {
    let app = spawn_app().await;
    let r = app.pay(4999, "pm_card_visa", "manual", false).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("pending")),
        "{}",
        r.body
    );
    let p = id(&r.body);

    let r = app.post(&format!("/api/v1/payments/{p}/confirm"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "authorized");
    assert_eq!(r.body["amount_capturable"], 4999);
    assert!(r.body["psp_reference"].as_str().unwrap().starts_with("pi_"));

    let r = app
        .post(
            &format!("/api/v1/payments/{p}/capture"),
            json!({ "amount": { "value": 3000, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (
            r.body["status"].as_str(),
            r.body["amount_captured"].as_i64(),
            r.body["amount_capturable"].as_i64()
        ),
        (Some("captured"), Some(3000), Some(0))
    );

    // A second capture is not allowed in `captured`.
    let r = app.post(&format!("/api/v1/payments/{p}/capture"), json!({})).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("payment_invalid_state"))
    );

    for _ in 0..2 {
        let r = app
            .post(
                &format!("/api/v1/payments/{p}/refunds"),
                json!({ "amount": { "value": 1000, "currency": "USD" } }),
            )
            .await;
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (201, Some("succeeded")),
            "{}",
            r.body
        );
        assert!(r.body["refund_id"].as_str().unwrap().starts_with("re_"));
    }
    let r = app
        .post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 1001, "currency": "USD" } }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("amount_too_large"))
    );
    // No amount: all that is left.
    let r = app.post(&format!("/api/v1/payments/{p}/refunds"), json!({})).await;
    assert_eq!(
        (r.status, r.body["amount"]["value"].as_i64()),
        (201, Some(1000)),
        "{}",
        r.body
    );
    let r = app.post(&format!("/api/v1/payments/{p}/refunds"), json!({})).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("amount_too_large")),
        "nothing left in refunded"
    );

    let r = app.get(&format!("/api/v1/payments/{p}")).await;
    assert_eq!(
        (r.body["status"].as_str(), r.body["amount_refunded"].as_i64()),
        (Some("refunded"), Some(3000))
    );
    let r = app.get(&format!("/api/v1/payments/{p}/refunds")).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 3);
    let refund = r.body["data"][0]["refund_id"].as_str().unwrap().to_owned();
    let r = app.get(&format!("/api/v1/refunds/{refund}")).await;
    assert_eq!((r.status, r.body["amount"]["value"].as_i64()), (200, Some(1000)));

    let trail = app.get(&format!("/api/v1/payments/{p}/events")).await.body["data"]
        .as_array()
        .unwrap()
        .clone();
    let path: Vec<&str> = trail.iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(
        path,
        [
            "pending",
            "authorized",
            "captured",
            "refunding",
            "captured",
            "refunding",
            "captured",
            "refunding",
            "refunded"
        ]
    );
    assert_eq!(trail[1]["cause"], "api.confirm");

    let journals = balanced_journals(&app, &p).await;
    let kinds: Vec<&str> = journals.iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["capture", "refund", "refund", "refund"]);
    // 2.9% + 30 of 3000 = 117 to the platform; the merchant got 2883 and gave back 3000.
    let balance = app.get("/api/v1/balance").await;
    assert_eq!(
        balance.body["balances"][0],
        json!({ "currency": "USD", "payable": -117, "pending_refunds": 0 })
    );
}

#[actix_web::test]
async fn automatic_capture_goes_straight_to_captured_with_one_capture_journal() {
    let app = spawn_app().await;
    let r = app.pay(2500, "pm_card_mastercard", "automatic", true).await;
    assert_eq!(
        (r.status, r.body["status"].as_str(), r.body["amount_captured"].as_i64()),
        (201, Some("captured"), Some(2500)),
        "{}",
        r.body
    );
    let journals = balanced_journals(&app, &id(&r.body)).await;
    assert_eq!(journals.len(), 1);
    assert_eq!(
        journals[0]["entries"][0],
        json!({ "account": "psp_clearing", "debit": 2500, "credit": 0 })
    );
    let trail = app.get(&format!("/api/v1/payments/{}/events", id(&r.body))).await.body;
    assert_eq!(
        (trail["data"][1]["cause"].as_str(), trail["data"][1]["to"].as_str()),
        (Some("api.confirm"), Some("captured"))
    );
}

#[actix_web::test]
async fn cancel_works_from_pending_and_authorized_but_not_captured() {
    let app = spawn_app().await;
    let pending = id(&app.pay(100, "pm_card_visa", "manual", false).await.body);
    let r = app
        .post(
            &format!("/api/v1/payments/{pending}/cancel"),
            json!({ "reason": "requested_by_customer" }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        r.body
    );

    let authorized = id(&app.pay(100, "pm_card_visa", "manual", true).await.body);
    let r = app
        .post(&format!("/api/v1/payments/{authorized}/cancel"), json!({}))
        .await;
    assert_eq!(
        (
            r.status,
            r.body["status"].as_str(),
            r.body["amount_capturable"].as_i64()
        ),
        (200, Some("canceled"), Some(0))
    );
    // Terminal: nothing more.
    let r = app
        .post(&format!("/api/v1/payments/{authorized}/capture"), json!({}))
        .await;
    assert_eq!(r.status, 409);

    let captured = id(&app.pay(100, "pm_card_visa", "automatic", true).await.body);
    let r = app
        .post(&format!("/api/v1/payments/{captured}/cancel"), json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("payment_invalid_state"))
    );
    let r = app
        .post(&format!("/api/v1/payments/{authorized}/refunds"), json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("payment_invalid_state"))
    );
}

#[actix_web::test]
async fn declines_and_fraud_blocks_are_failed_payments_not_errors() {
    let app = spawn_app().await;
    for (token, code, decline) in [
        ("pm_card_chargeDeclined", "card_declined", Some("generic_decline")),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "card_declined",
            Some("insufficient_funds"),
        ),
        ("pm_card_riskLevelHighest", "fraudulent", None),
    ] {
        let r = app.pay(1000, token, "automatic", true).await;
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (201, Some("failed")),
            "{token}: {}",
            r.body
        );
        assert_eq!(r.body["failure"]["code"], code);
        assert_eq!(r.body["failure"]["decline_code"].as_str(), decline);
        assert!(
            balanced_journals(&app, &id(&r.body)).await.is_empty(),
            "a failed payment posts nothing"
        );
        let r = app
            .post(&format!("/api/v1/payments/{}/capture", id(&r.body)), json!({}))
            .await;
        assert_eq!(r.status, 409);
    }
}

#[actix_web::test]
async fn three_d_secure_requires_action_then_completes() {
    let app = spawn_app().await;
    for (capture, after) in [("manual", "authorized"), ("automatic", "captured")] {
        let r = app.pay(4200, "pm_card_threeDSecureRequired", capture, true).await;
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (201, Some("requires_action")),
            "{}",
            r.body
        );
        assert_eq!(r.body["next_action"]["type"], "three_d_secure");
        let reference = r.body["psp_reference"].as_str().unwrap().to_owned();
        let path = format!("/sandbox/v1/payments/{reference}/complete_3ds");
        let done = app.complete_3ds(&reference).await;
        assert_eq!(
            (done.status, done.body["status"].as_str()),
            (200, Some(after)),
            "{}",
            done.body
        );
        assert!(done.body["next_action"].is_null());
        let again = app.complete_3ds(&reference).await;
        assert_eq!(
            (again.status, again.body["error"]["code"].as_str()),
            (409, Some("payment_invalid_state"))
        );
        let unauthenticated = app.request("POST", &path, None, None, None).await;
        assert_eq!(unauthenticated.status, 401);
    }
}

#[actix_web::test]
async fn the_dispute_card_succeeds_at_authorization() {
    let app = spawn_app().await;
    let r = app.pay(1500, "pm_card_createDispute", "automatic", true).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("captured")),
        "{}",
        r.body
    );
}

#[actix_web::test]
async fn tokenized_test_cards_behave_like_their_named_tokens() {
    let app = spawn_app().await;
    let key = Some(crate::helpers::DEMO_KEY);
    let tokenize = |number: &'static str| {
        let body = json!({ "card": { "number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123" } }).to_string();
        let app = &app;
        async move {
            app.request("POST", "/sandbox/v1/payment_methods", key, None, Some(&body))
                .await
        }
    };
    let r = tokenize("4242 4242 4242 4242").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["card"],
        json!({ "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030 })
    );
    let ok = r.body["id"].as_str().unwrap().to_owned();
    let r = app.pay(700, &ok, "automatic", true).await;
    assert_eq!(r.body["status"], "captured", "{}", r.body);

    let declined = tokenize("4000000000000002").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app.pay(700, &declined, "automatic", true).await;
    assert_eq!(r.body["failure"]["decline_code"], "generic_decline");

    for bad in ["4242424242424241", "1234", "abcd"] {
        let r = tokenize(bad).await;
        assert_eq!(
            (r.status, r.body["error"]["param"].as_str()),
            (400, Some("card.number")),
            "{bad}"
        );
    }
    // Another merchant cannot use this merchant's token.
    let other = app.new_merchant().await;
    let body = json!({ "order_id": "o", "amount": { "value": 700, "currency": "USD" }, "payment_method": ok, "confirm": true });
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(&other),
            Some("k"),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("resource_missing")),
        "{}",
        r.body
    );
}

#[actix_web::test]
async fn listing_is_newest_first_with_cursor_and_filters() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({ "order_id": format!("ord_{i}"), "amount": { "value": 100 + i, "currency": "USD" }, "payment_method": "pm_card_visa" });
        ids.push(id(&app.post("/api/v1/payments", body).await.body));
    }
    let r = app.get("/api/v1/payments?limit=2").await;
    let page: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["payment_id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[4].as_str(), ids[3].as_str()]);
    assert_eq!(r.body["has_more"], true);
    let r = app
        .get(&format!("/api/v1/payments?limit=10&starting_after={}", ids[3]))
        .await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 3);
    assert_eq!(r.body["has_more"], false);
    let r = app.get("/api/v1/payments?order_id=ord_2").await;
    assert_eq!(r.body["data"][0]["payment_id"], ids[2].as_str());
    let r = app.get("/api/v1/payments?status=captured").await;
    assert!(r.body["data"].as_array().unwrap().is_empty());
    for bad in [
        "limit=0",
        "limit=101",
        "status=nope",
        "starting_after=xyz",
        "created_gte=yesterday",
        "created[lt]=soon",
        "created[gte]=1&created_gte=1",
    ] {
        assert_eq!(app.get(&format!("/api/v1/payments?{bad}")).await.status, 400, "{bad}");
    }
    // Stripe's spelling of the time range, as the events API takes it too.
    let future = chrono::Utc::now().timestamp() + 3600;
    let r = app.get(&format!("/api/v1/payments?created%5Bgte%5D={future}")).await;
    assert_eq!((r.status, r.body["data"].clone()), (200, json!([])));
    let r = app
        .get(&format!("/api/v1/payments?created[lt]={future}&limit=100"))
        .await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 5);
}
