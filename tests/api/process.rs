//! The real binary as README.md runs it: a `bind` override that the sandbox's webhooks follow,
//! configuration mistakes refused by name, and a graceful stop on SIGTERM.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::crash::{command, wait_ready};
use crate::helpers::{database_name, drop_database, free_port, stream_prefix, DEMO_KEY};

fn database_url() -> (String, String) {
    let base = payrail::config::Config::load(std::path::Path::new(payrail::config::repo_config_path())).unwrap();
    let root = base.database.url.rsplit_once('/').unwrap().0.to_owned();
    let name = database_name();
    (format!("{root}/{name}"), name)
}

async fn post(client: &awc::Client, port: u16, path: &str, key: &str, body: Value) -> (u16, Value) {
    let mut r = client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
        .insert_header(("Idempotency-Key", key))
        .insert_header(("Content-Type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("answered");
    let body = r.body().await.unwrap();
    (
        r.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// README's own example: `PAYRAIL__SERVER__BIND=…:<port>` with nothing else. The sandbox's
/// webhooks go to that port (public_url follows bind), so the dispute card's dispute opens.
#[actix_web::test]
async fn the_sandbox_webhooks_follow_a_bind_override() {
    crate::helpers::captured_logs();
    let (url, name) = database_url();
    let port = free_port();
    let mut child = command(&url, &stream_prefix(), port)
        .env("PAYRAIL__PSP__SANDBOX__DISPUTE_DELAY_MS", "100")
        .spawn()
        .expect("payrail starts");
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    wait_ready(&client, port).await;
    let (status, p) = post(
        &client,
        port,
        "/api/v1/payments",
        "bind-1",
        json!({ "order_id": "o1", "amount": { "value": 900, "currency": "USD" },
                "payment_method": "pm_card_createDispute", "confirm": true }),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut r = client
            .get(format!("http://127.0.0.1:{port}/api/v1/payments/{id}"))
            .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
            .send()
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&r.body().await.unwrap()).unwrap();
        if body["status"] == "chargeback_open" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sandbox's dispute webhook never arrived: {body}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    drop_database(url.rsplit_once('/').unwrap().0, &name).await;
}

/// A misspelt override or an unknown key stops payrail at start, naming it.
#[actix_web::test]
async fn a_misspelt_override_is_refused_at_start_by_name() {
    let (url, _) = database_url();
    let out = command(&url, &stream_prefix(), free_port())
        .env("PAYRAIL__SERVER__BIN", "127.0.0.1:9000")
        .stderr(Stdio::piped())
        .output()
        .expect("payrail runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PAYRAIL__SERVER__BIN"), "{err}");
}

/// SIGTERM: payrail stops accepting, answers the request in flight, and exits 0 in time.
#[actix_web::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits() {
    crate::helpers::captured_logs();
    let (url, name) = database_url();
    let port = free_port();
    let mut child = command(&url, &stream_prefix(), port)
        .env("PAYRAIL__PSP__SANDBOX__LATENCY_MS", "1500")
        .env("PAYRAIL__SERVER__SHUTDOWN_TIMEOUT_SECS", "10")
        .spawn()
        .expect("payrail starts");
    let client = awc::Client::builder().timeout(Duration::from_secs(20)).finish();
    wait_ready(&client, port).await;
    let in_flight = {
        let client = client.clone();
        actix_rt::spawn(async move {
            post(
                &client,
                port,
                "/api/v1/payments",
                "term-1",
                json!({ "order_id": "o1", "amount": { "value": 500, "currency": "USD" },
                        "payment_method": "pm_card_visa", "confirm": true }),
            )
            .await
        })
    };
    // The request is in the actor, waiting for the slow PSP, when the signal comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let db = loop {
        if let Ok((db, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            actix_rt::spawn(conn);
            break db;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL refused every connection for 10 s"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    loop {
        let n: i64 = db
            .query_one("SELECT count(*) FROM psp_attempts", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the request never reached the PSP");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 201, "the request in flight finished: {body}");
    assert_eq!(body["status"], "captured");
    // Exits by itself, cleanly, well within the bound.
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(signalled.elapsed() < Duration::from_secs(15), "payrail did not exit");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err(),
        "nothing listens any more"
    );
    drop(db);
    drop_database(url.rsplit_once('/').unwrap().0, &name).await;
}
