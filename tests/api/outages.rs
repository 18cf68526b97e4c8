//! PSP events across outages, with processes this test owns: its own nats-server (never the
//! shared one), stopped and restarted; and the real payrail binary killed with SIGKILL while
//! events are in flight.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payrail::adapters::psp::signature::sign_stripe;
use serde_json::json;

use crate::helpers::{free_port, spawn_app_with, DEMO_KEY};

pub(crate) fn nats_server(port: u16, store: &std::path::Path) -> Child {
    Command::new("/usr/sbin/nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts")
}

async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signed(body: &str, secret: &str) -> String {
    sign_stripe(body.as_bytes(), secret, chrono::Utc::now().timestamp())
}

#[actix_web::test]
async fn with_nats_down_webhooks_get_503_and_the_event_is_applied_once_it_is_back() {
    let port = free_port();
    let store = std::env::temp_dir().join(format!("payrail-nats-{port}"));
    let mut nats = nats_server(port, &store);
    let probe = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(probe.elapsed() < Duration::from_secs(10), "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let app = spawn_app_with(|c| {
        c.nats.url = format!("nats://127.0.0.1:{port}");
        c.nats.publish_timeout_ms = 500;
        c.psp.sandbox.webhooks = false;
    })
    .await;
    let r = app.pay(1500, "pm_card_visa", "manual", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let secret = app.state.config.webhooks.secret.clone();
    let body = json!({ "id": "evt_outage", "object": "event", "type": "payment_intent.succeeded",
                       "data": { "object": { "id": pi, "amount_received": 1500 } } })
    .to_string();
    let send = || {
        let (client, url, body, secret) = (
            app.client.clone(),
            format!("{}/internal/webhooks/psp/sandbox", app.address),
            body.clone(),
            secret.clone(),
        );
        async move {
            let r = client
                .post(url)
                .insert_header(("Stripe-Signature", signed(&body, &secret)))
                .send_body(body)
                .await
                .unwrap();
            r.status().as_u16()
        }
    };

    nats.kill().unwrap();
    let _ = nats.wait();
    let started = Instant::now();
    assert_eq!(send().await, 503, "NATS down: the PSP must retry");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 comes fast: {:?}",
        started.elapsed()
    );
    wait_for("readiness to fail", 10, async || {
        app.request("GET", "/readyz", None, None, None).await.status == 503
    })
    .await;
    // What does not need NATS keeps working.
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"],
        "authorized"
    );

    let mut nats = nats_server(port, &store);
    wait_for("the PSP's retry to be accepted", 20, async || send().await == 200).await;
    wait_for("the event to be applied", 20, async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "captured"
    })
    .await;
    let db = app.sql().await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM journals WHERE payment_id = $1", &[&p])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    nats.kill().unwrap();
    let _ = nats.wait();
    let _ = std::fs::remove_dir_all(&store);
}

fn payrail(database_url: &str, prefix: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(["serve", "--config", payrail::config::repo_config_path()])
        .env("PAYRAIL__DATABASE__URL", database_url)
        .env("PAYRAIL__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("PAYRAIL__NATS__STREAM_PREFIX", prefix)
        .env("PAYRAIL__PSP__SANDBOX__WEBHOOKS", "false")
        .env("PAYRAIL__NATS__ACK_WAIT_SECS", "2")
        .env("PAYRAIL__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("payrail starts")
}

async fn ready(client: &awc::Client, port: u16) {
    wait_for("payrail", 30, async || {
        matches!(client.get(format!("http://127.0.0.1:{port}/readyz")).send().await, Ok(r) if r.status().is_success())
    })
    .await;
}

#[actix_web::test]
async fn events_in_flight_when_payrail_is_killed_are_redelivered_and_applied_once() {
    crate::helpers::captured_logs();
    let config = payrail::config::Config::load(std::path::Path::new(payrail::config::repo_config_path())).unwrap();
    let root = config.database.url.rsplit_once('/').unwrap().0.to_owned();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let db_name = format!(
        "payrail_test_{secs}_inflight{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let database_url = format!("{root}/{db_name}");
    let prefix = format!("T{secs}XINFLIGHT{}", &uuid::Uuid::new_v4().simple().to_string()[..4]).to_uppercase();
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let secret = config.webhooks.secret.clone();

    let port = free_port();
    let mut server = payrail(&database_url, &prefix, port);
    ready(&client, port).await;
    let mut intents = Vec::new();
    for i in 0..40 {
        let body = json!({ "order_id": format!("o{i}"), "amount": { "value": 1000 + i, "currency": "USD" },
                           "payment_method": "pm_card_visa", "capture_strategy": "manual", "confirm": true });
        let mut r = client
            .post(format!("http://127.0.0.1:{port}/api/v1/payments"))
            .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
            .insert_header(("Idempotency-Key", format!("inflight-{i}")))
            .send_json(&body)
            .await
            .unwrap();
        let p: serde_json::Value = r.json().await.unwrap();
        intents.push((
            p["payment_id"].as_str().unwrap().to_owned(),
            p["psp_reference"].as_str().unwrap().to_owned(),
            1000 + i,
        ));
    }
    // Every event is accepted (published), then payrail dies at once, acks or not.
    for (n, (_, pi, amount)) in intents.iter().enumerate() {
        let body = json!({ "id": format!("evt_inflight_{n}"), "object": "event", "type": "payment_intent.succeeded",
                           "data": { "object": { "id": pi, "amount_received": amount } } })
        .to_string();
        let r = client
            .post(format!("http://127.0.0.1:{port}/internal/webhooks/psp/sandbox"))
            .insert_header(("Stripe-Signature", signed(&body, &secret)))
            .send_body(body)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    server.kill().unwrap();
    let _ = server.wait();

    let port = free_port();
    let mut restarted = payrail(&database_url, &prefix, port);
    ready(&client, port).await;
    let (db, conn) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_rt::spawn(conn);
    wait_for("every event applied", 30, async || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM payments WHERE status = 'captured'", &[])
            .await
            .unwrap()
            .get(0);
        n == 40
    })
    .await;
    let journals: i64 = db.query_one("SELECT count(*) FROM journals", &[]).await.unwrap().get(0);
    let processed: i64 = db
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_id LIKE 'evt_inflight_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((journals, processed), (40, 40), "each event applied exactly once");
    restarted.kill().unwrap();
    let _ = restarted.wait();
    crate::helpers::drop_database(&root, &db_name).await;
}

/// The unauthenticated probes use at most `PROBES` database connections each: with every
/// scrape permit taken (a flood of scrapes), `/metrics` still answers at once, without its
/// database figures, and `/readyz` is not affected; with every readiness permit taken (a flood
/// of pings), `/readyz` says not ready rather than wait for the pool.
#[actix_web::test]
async fn a_flood_of_probes_never_holds_more_than_its_connections() {
    let app = crate::helpers::spawn_app().await;
    assert_eq!(app.request("GET", "/readyz", None, None, None).await.status, 200);
    let scrapes = app
        .state
        .probes
        .acquire_many(payrail::api::PROBES as u32)
        .await
        .unwrap();
    let started = Instant::now();
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    assert_eq!(metrics.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(app.request("GET", "/readyz", None, None, None).await.status, 200);
    drop(scrapes);
    let pings = app
        .state
        .readiness
        .acquire_many(payrail::api::PROBES as u32)
        .await
        .unwrap();
    let ready = app.request("GET", "/readyz", None, None, None).await;
    assert_eq!(
        (ready.status, ready.body["database"].clone()),
        (503, serde_json::json!(false))
    );
    drop(pings);
    assert_eq!(app.request("GET", "/readyz", None, None, None).await.status, 200);
}
