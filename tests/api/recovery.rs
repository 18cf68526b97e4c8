//! What happens when things break: a PSP call that timed out is completed by the retry (no
//! double charge, no lost charge), PostgreSQL unreachable means 503 and recovery after, and
//! idle actors leave memory and come back on demand.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

const CREATE: &str =
    r#"{"order_id":"ord_r","amount":{"value":2000,"currency":"USD"},"payment_method":"pm_card_visa","confirm":true}"#;

/// An app whose PSP answers after its own timeout: every PSP call is left open.
async fn app_with_a_psp_that_times_out(database_url: Option<&str>) -> TestApp {
    let url = database_url.map(str::to_owned);
    spawn_app_with(move |c| {
        c.psp.timeout_ms = 50;
        c.psp.sandbox.latency_ms = 400;
        if let Some(u) = url {
            c.database.url = u;
        }
    })
    .await
}

async fn open_attempts(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one("SELECT count(*) FROM psp_attempts WHERE outcome IS NULL", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn a_confirm_left_open_by_a_psp_timeout_is_completed_once_by_its_retry() {
    let slow = app_with_a_psp_that_times_out(None).await;
    let r = slow
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("k-open"), Some(CREATE))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    assert_eq!(
        open_attempts(&slow).await,
        1,
        "the attempt was recorded before the call"
    );
    assert_eq!(slow.count("journals").await, 0);

    // payrail comes back with a PSP that answers: the retry resends the same attempt.
    slow.stop().await.unwrap();
    let healthy = spawn_app_with(|c| c.database.url = slow.database_url.clone()).await;
    let r = healthy
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("k-open"), Some(CREATE))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("captured")),
        "{}",
        r.body
    );
    assert_eq!(healthy.count("payments").await, 1);
    assert_eq!(healthy.count("journals").await, 1);
    assert_eq!(open_attempts(&healthy).await, 0);
    let replay = healthy
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("k-open"), Some(CREATE))
        .await;
    assert_eq!((replay.status, replay.raw == r.raw), (201, true));
}

/// Sets the added latency of the demo merchant's sandbox connector.
async fn set_latency(app: &TestApp, ms: u64) {
    let connector = app.get("/api/v1/connectors").await.body["data"][0].clone();
    let path = format!(
        "/admin/v1/merchants/{}/connectors/{}",
        connector["merchant_id"].as_str().unwrap(),
        connector["id"].as_str().unwrap()
    );
    let body = json!({ "settings": { "latency_ms": ms } }).to_string();
    let token = app.state.config.admin.token.clone();
    let r = app.request("POST", &path, Some(&token), None, Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[actix_web::test]
async fn a_refund_left_open_stays_reserved_and_its_retry_completes_it_once() {
    let healthy = spawn_app_with(|c| c.psp.timeout_ms = 150).await;
    let p = healthy.pay(3000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The payment's connector turns slow: the refund's call is left open (it may have been
    // made). The embedded sandbox keeps its charges in memory, so this is one process
    // throughout, its connector slowed and then restored.
    set_latency(&healthy, 600).await;
    let path = format!("/api/v1/payments/{p}/refunds");
    let body = r#"{"amount":{"value":2000,"currency":"USD"}}"#;
    let r = healthy
        .request("POST", &path, Some(DEMO_KEY), Some("rf-open"), Some(body))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    set_latency(&healthy, 0).await;

    // The pending refund holds its amount: a second refund cannot take it.
    let r = healthy
        .post(&path, json!({ "amount": { "value": 1001, "currency": "USD" } }))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("amount_too_large")),
        "{}",
        r.body
    );

    let r = healthy
        .request("POST", &path, Some(DEMO_KEY), Some("rf-open"), Some(body))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str(), r.body["amount"]["value"].as_i64()),
        (201, Some("succeeded"), Some(2000)),
        "{}",
        r.body
    );
    assert_eq!(healthy.count("refunds").await, 1);
    let kinds: Vec<String> = healthy
        .sql()
        .await
        .query("SELECT kind FROM journals ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["capture", "refund"]);
    assert_eq!(
        healthy.get(&format!("/api/v1/payments/{p}")).await.body["amount_refunded"],
        2000
    );
}

#[actix_web::test]
async fn postgres_unreachable_means_503_then_everything_resumes() {
    let app = spawn_app().await;
    let p = app.pay(1000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let db = app.database_url.rsplit('/').next().unwrap().to_owned();
    let admin_url = format!("{}/postgres", app.database_url.rsplit_once('/').unwrap().0);
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_rt::spawn(conn);
    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap();

    let started = Instant::now();
    let r = app.pay(1000, "pm_card_visa", "manual", true).await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.get(&format!("/api/v1/payments/{p}")).await.status, 503);
    assert_eq!(
        app.post(&format!("/api/v1/payments/{p}/capture"), json!({}))
            .await
            .status,
        503
    );
    assert_eq!(app.request("GET", "/readyz", None, None, None).await.status, 503);
    assert_eq!(app.request("GET", "/healthz", None, None, None).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failing closed is fast: {:?}",
        started.elapsed()
    );

    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    wait_until("readiness", || async {
        app.request("GET", "/readyz", None, None, None).await.status == 200
    })
    .await;
    let r = app.post(&format!("/api/v1/payments/{p}/capture"), json!({})).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        r.body
    );
    assert_eq!(
        app.count("payments").await,
        1,
        "nothing was stored while the database was away"
    );
}

#[actix_web::test]
async fn idle_actors_leave_memory_and_come_back_on_demand() {
    let app = spawn_app_with(|c| c.actors.idle_timeout_ms = 100).await;
    let p = app.pay(1000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.state.registry.live(), 1);
    wait_until("passivation", || async { app.state.registry.live() == 0 }).await;
    assert_eq!(app.state.registry.stats.live(), 0);
    let r = app.post(&format!("/api/v1/payments/{p}/capture"), json!({})).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        r.body
    );
    assert_eq!(app.state.registry.stats.depth(), 0, "every send was received");
}

#[actix_web::test]
async fn an_attempt_left_open_is_completed_even_if_no_client_returns() {
    let slow = app_with_a_psp_that_times_out(None).await;
    let r = slow
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("k-gone"), Some(CREATE))
        .await;
    assert_eq!(r.status, 503);
    // A restarted payrail with a working PSP finds it on its own.
    slow.stop().await.unwrap();
    let healthy = spawn_app_with(|c| {
        c.database.url = slow.database_url.clone();
        c.psp.timeout_ms = 200;
    })
    .await;
    wait_until("the sweeper", || async { open_attempts(&healthy).await == 0 }).await;
    let status: String = healthy
        .sql()
        .await
        .query_one("SELECT status FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "captured");
    assert_eq!(healthy.count("journals").await, 1);
}

#[actix_web::test]
async fn the_sweeper_pages_through_every_stale_attempt_oldest_first() {
    // A slow tick: the sweeper stays out of the way while the pages are read here.
    let app = spawn_app_with(|c| c.psp.timeout_ms = 30_000).await;
    let db = app.sql().await;
    let mut ids = Vec::new();
    for (n, minutes) in [(1, 50), (2, 70), (3, 60)] {
        let p = app.pay(1_000 + n, "pm_card_visa", "manual", true).await;
        let id = p.body["payment_id"].as_str().unwrap().to_owned();
        db.execute(
            "INSERT INTO psp_attempts (id, payment_id, operation, amount, started_at)
             VALUES ($1, $2, 'capture', 100, now() - make_interval(mins => $3))",
            &[&format!("att_stale_{n}"), &id, &minutes],
        )
        .await
        .unwrap();
        ids.push(id);
    }
    // Oldest first: payment 2 (70 min), 3 (60), 1 (50); two a page, then the rest, then none.
    let page = |after| {
        let db = &app.state.db;
        async move { db.payments_with_stale_attempts(60_000, after, 2).await.unwrap() }
    };
    let first = page(None).await;
    let names = |p: &[(payrail::domain::PaymentId, payrail::domain::MerchantId, _)]| {
        p.iter().map(|(id, _, _)| id.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(&first), [ids[1].clone(), ids[2].clone()]);
    let second = page(Some(&first[1].2)).await;
    assert_eq!(names(&second), [ids[0].clone()]);
    assert!(page(Some(&second[0].2)).await.is_empty());
}
