//! Another merchant's objects do not exist for you: 404 on every route, never 403.

use serde_json::json;

use crate::helpers::{spawn_app, DEMO_KEY};

#[actix_web::test]
async fn another_merchants_payment_is_404_on_every_route() {
    let app = spawn_app().await;
    let other = app.new_merchant().await;
    let r = app.pay(3000, "pm_card_threeDSecureRequired", "manual", true).await;
    let p = r.body["payment_id"].as_str().unwrap().to_owned();
    let reference = r.body["psp_reference"].as_str().unwrap().to_owned();
    let captured = app.pay(3000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refund = app
        .post(
            &format!("/api/v1/payments/{captured}/refunds"),
            json!({ "amount": { "value": 100, "currency": "USD" } }),
        )
        .await;
    let refund = refund.body["refund_id"].as_str().unwrap().to_owned();

    let routes = [
        ("GET", format!("/api/v1/payments/{p}")),
        ("GET", format!("/api/v1/payments/{p}/events")),
        ("GET", format!("/api/v1/payments/{captured}/refunds")),
        ("GET", format!("/api/v1/refunds/{refund}")),
        ("GET", format!("/api/v1/ledger/journals?payment_id={captured}")),
        ("POST", format!("/api/v1/payments/{p}/confirm")),
        ("POST", format!("/api/v1/payments/{p}/capture")),
        ("POST", format!("/api/v1/payments/{p}/cancel")),
        ("POST", format!("/api/v1/payments/{captured}/refunds")),
        ("POST", format!("/sandbox/v1/payments/{reference}/complete_3ds")),
    ];
    for (i, (method, path)) in routes.iter().enumerate() {
        let idem = format!("iso-{i}");
        let r = app.request(method, path, Some(&other), Some(&idem), Some("{}")).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (404, Some("resource_missing")),
            "{method} {path}: {}",
            r.body
        );
    }
    // The owner still sees everything unchanged.
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"],
        "requires_action"
    );
    assert_eq!(
        app.get(&format!("/api/v1/payments/{captured}")).await.body["amount_refunded"],
        100
    );
    // The other merchant's list and balance are empty.
    let list = app.request("GET", "/api/v1/payments", Some(&other), None, None).await;
    assert!(list.body["data"].as_array().unwrap().is_empty());
}

#[actix_web::test]
async fn missing_or_wrong_credentials_are_401() {
    let app = spawn_app().await;
    for key in [
        None,
        Some("sk_test_wrong"),
        Some("nonsense"),
        Some(app.state.config.admin.token.as_str()),
    ] {
        for (method, path) in [
            ("GET", "/api/v1/payments"),
            ("POST", "/api/v1/payments"),
            ("GET", "/api/v1/balance"),
        ] {
            let r = app.request(method, path, key, Some("k"), Some("{}")).await;
            assert_eq!(
                (r.status, r.body["error"]["type"].as_str()),
                (401, Some("authentication_error")),
                "{key:?} {path}"
            );
        }
    }
    let r = app
        .request(
            "POST",
            "/admin/v1/merchants",
            Some(DEMO_KEY),
            None,
            Some(r#"{"name":"x","default_currency":"USD"}"#),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = app
        .request(
            "POST",
            "/admin/v1/merchants",
            None,
            None,
            Some(r#"{"name":"x","default_currency":"USD"}"#),
        )
        .await;
    assert_eq!(r.status, 401);
}

#[actix_web::test]
async fn keys_not_in_the_cache_are_looked_up_a_few_at_a_time() {
    let app = crate::helpers::spawn_app_with(|c| c.database.pool_wait_ms = 300).await;
    // A key in the cache needs no look-up.
    assert_eq!(app.get("/api/v1/balance").await.status, 200);
    let other = app.new_merchant().await;
    // Every look-up permit taken (as by a flood of made-up keys): a key the cache does not hold
    // waits its turn, at most the pool's wait, then is a 503; a cached key goes through.
    let held = app
        .state
        .key_lookups
        .acquire_many(payrail::api::KEY_LOOKUPS as u32)
        .await
        .unwrap();
    let waiting = app.request("GET", "/api/v1/balance", Some(&other), None, None).await;
    assert_eq!(waiting.status, 503, "{}", waiting.body);
    let made_up = app
        .request("GET", "/api/v1/balance", Some("sk_test_madeup"), None, None)
        .await;
    assert_eq!(made_up.status, 503, "{}", made_up.body);
    assert_eq!(app.get("/api/v1/balance").await.status, 200);
    drop(held);
    let served = app.request("GET", "/api/v1/balance", Some(&other), None, None).await;
    assert_eq!(served.status, 200, "{}", served.body);
    let made_up = app
        .request("GET", "/api/v1/balance", Some("sk_test_madeup"), None, None)
        .await;
    assert_eq!(made_up.status, 401);
}

/// A client whose made-up keys missed `failed_keys_per_minute` times is refused look-ups for the
/// rest of the minute (429, with the seconds left), a key it had to look up among them; keys
/// this process already holds still pass.
#[actix_web::test]
async fn a_client_whose_keys_keep_failing_is_refused_look_ups_for_the_minute() {
    let app = crate::helpers::spawn_app_with(|c| c.ratelimit.failed_keys_per_minute = 3).await;
    assert_eq!(app.get("/api/v1/balance").await.status, 200);
    let other = app.new_merchant().await;
    let mut refused = None;
    // Three misses are 401s; the fourth look-up is refused (unless the minute turned between
    // them, when the count starts again: a few more tries, bounded).
    for _ in 0..8 {
        let r = app
            .request("GET", "/api/v1/balance", Some("sk_test_madeup"), None, None)
            .await;
        match r.status {
            401 => assert_eq!(r.body["error"]["type"], "authentication_error"),
            429 => {
                refused = Some(r);
                break;
            }
            s => panic!("{s} {}", r.body),
        }
    }
    let r = refused.expect("refused after three misses");
    assert_eq!(
        (r.body["error"]["type"].as_str(), r.body["error"]["code"].as_str()),
        (Some("rate_limit_error"), Some("too_many_failed_keys")),
    );
    let after: u64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    let m = app.request("GET", "/metrics", None, None, None).await;
    let metrics = String::from_utf8_lossy(&m.raw);
    assert!(
        metrics.lines().any(|l| l == "payrail_api_key_lookups_refused_total 1"),
        "{metrics}"
    );
    // A key this process has answered before passes; one it would have to look up does not
    // (it may be the guess that came right).
    assert_eq!(app.get("/api/v1/balance").await.status, 200);
    let lookup = app.request("GET", "/api/v1/balance", Some(&other), None, None).await;
    if after >= 3 {
        // (With less left, the minute may have turned by now.)
        assert_eq!(lookup.status, 429, "{}", lookup.body);
    }
}

/// Many made-up keys from one client at once: those that waited for a look-up turn while the
/// others missed are refused when their turn comes, so the misses stop near the limit (at most
/// one more per look-up turn) instead of at the size of the burst.
#[actix_web::test]
async fn a_burst_of_made_up_keys_stops_near_the_limit() {
    let app = crate::helpers::spawn_app_with(|c| c.ratelimit.failed_keys_per_minute = 3).await;
    // Not across a minute's turn, which starts the count again.
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while second() >= 55 {
        assert!(std::time::Instant::now() < deadline);
        actix_rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let burst = (0..24).map(|i| {
        let app = &app;
        async move {
            let key = format!("sk_test_madeup{i}");
            app.request("GET", "/api/v1/balance", Some(&key), None, None)
                .await
                .status
        }
    });
    let statuses = futures_util::future::join_all(burst).await;
    let missed = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(missed + refused, 24, "{statuses:?}");
    assert!(missed <= 3 + payrail::api::KEY_LOOKUPS, "{statuses:?}");
}

#[actix_web::test]
async fn api_keys_are_stored_only_as_hashes() {
    let app = spawn_app().await;
    let key = app.new_merchant().await;
    let db = app.sql().await;
    let rows = db.query("SELECT key_hash, hint FROM api_keys", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let hash: Vec<u8> = row.get(0);
        let hint: String = row.get(1);
        assert_eq!(hash.len(), 32);
        assert!(!hint.contains(&key[8..]));
    }
}

#[actix_web::test]
async fn over_its_rate_a_merchant_gets_429_with_retry_after_and_nothing_stored() {
    let app = crate::helpers::spawn_app_with(|c| {
        c.ratelimit.enabled = true;
        c.ratelimit.requests_per_second = 1;
        c.ratelimit.burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            app.request("GET", "/api/v1/payments", Some(DEMO_KEY), None, None)
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("rl"), Some("{}"))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["type"].as_str()),
        (429, Some("rate_limit_error"))
    );
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.count("idempotency_keys").await, 0, "a 429 is not stored");
    // Another merchant is not affected.
    let other = app.new_merchant().await;
    assert_eq!(
        app.request("GET", "/api/v1/payments", Some(&other), None, None)
            .await
            .status,
        200
    );
}

#[actix_web::test]
async fn every_admin_route_wants_the_operator_token() {
    let app = spawn_app().await;
    for (method, path) in payrail::api::ROUTES.iter().filter(|(_, p)| p.starts_with("/admin/v1/")) {
        let concrete = path.replace("{kind}", "payment").replace("{id}", "pay_x");
        for key in [None, Some(DEMO_KEY), Some("admin_test_tokeN")] {
            let r = app
                .request(&method.to_uppercase(), &concrete, key, None, Some("{}"))
                .await;
            assert_eq!(
                (r.status, r.body["error"]["type"].as_str()),
                (401, Some("authentication_error")),
                "{method} {path} with {key:?}"
            );
        }
    }
}
