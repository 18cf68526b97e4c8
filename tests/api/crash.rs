//! Invariant 6: every 2xx is durable. The real binary takes load, is killed with SIGKILL
//! mid-run (mid-batch, at this rate), and restarts on the same database: every acknowledged
//! payment is there exactly as acknowledged, no journal was posted twice, the ledger verifies.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;

use crate::helpers::{free_port, DEMO_KEY};

pub(crate) struct Server {
    pub child: Child,
    pub port: u16,
}

/// The real binary, as README.md runs it, with its own database, stream prefix and port.
pub(crate) fn command(database_url: &str, prefix: &str, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_payrail"));
    c.args(["serve", "--config", payrail::config::repo_config_path()])
        .env("PAYRAIL__DATABASE__URL", database_url)
        .env("PAYRAIL__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("PAYRAIL__NATS__STREAM_PREFIX", prefix)
        .env("PAYRAIL__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn start(database_url: &str, prefix: &str, port: u16) -> Server {
    let child = command(database_url, prefix, port).spawn().expect("payrail starts");
    Server { child, port }
}

pub(crate) async fn wait_ready(client: &awc::Client, port: u16) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/readyz")).send().await {
            if r.status().is_success() {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "payrail did not become ready"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn every_acknowledged_payment_survives_a_kill_9_mid_batch() {
    crate::helpers::captured_logs();
    let base = payrail::config::Config::load(std::path::Path::new(payrail::config::repo_config_path())).unwrap();
    let root = base.database.url.rsplit_once('/').unwrap().0.to_owned();
    let db_name = format!(
        "payrail_test_{}_crash{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let database_url = format!("{root}/{db_name}");
    let prefix = format!(
        "T{}XCRASH",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();

    let mut server = start(&database_url, &prefix, free_port());
    wait_ready(&client, server.port).await;

    // 32 clients create+confirm as fast as they can; SIGKILL lands while batches are in flight.
    let port = server.port;
    // The kill lands once enough payments were acknowledged to make the drill mean something,
    // whatever the machine's speed (bounded: a server that acknowledges nothing is killed too).
    let deadline = Instant::now() + Duration::from_secs(30);
    let acked_so_far = std::sync::atomic::AtomicUsize::new(0);
    let acked_so_far = &acked_so_far;
    let workers = (0..32).map(|w| {
        let client = client.clone();
        async move {
            let mut acked: Vec<Value> = Vec::new();
            for i in 0.. {
                if Instant::now() > deadline {
                    break;
                }
                let body = format!(
                    r#"{{"order_id":"crash-{w}-{i}","amount":{{"value":{},"currency":"USD"}},"payment_method":"pm_card_visa","confirm":true}}"#,
                    1000 + i
                );
                let sent = client
                    .post(format!("http://127.0.0.1:{port}/api/v1/payments"))
                    .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
                    .insert_header(("Idempotency-Key", format!("crash-{w}-{i}")))
                    .insert_header(("Content-Type", "application/json"))
                    .send_body(body)
                    .await;
                let Ok(mut resp) = sent else { break };
                if resp.status().as_u16() == 201 {
                    if let Ok(b) = resp.body().await {
                        acked.push(serde_json::from_slice(&b).unwrap());
                        acked_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            acked
        }
    });
    let killer = async {
        let enough = Instant::now() + Duration::from_secs(15);
        while acked_so_far.load(std::sync::atomic::Ordering::Relaxed) < 100 && Instant::now() < enough {
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        // SIGKILL: no shutdown hook, no flush, no goodbye.
        server.child.kill().expect("kill -9");
        let _ = server.child.wait();
    };
    let (acked, ()) = futures_util::future::join(join_all(workers), killer).await;
    let acked: Vec<Value> = acked.into_iter().flatten().collect();
    assert!(
        acked.len() > 50,
        "the load ran before the kill: {} acknowledged",
        acked.len()
    );

    let mut restarted = start(&database_url, &prefix, free_port());
    let ready_after = wait_ready(&client, restarted.port).await;
    eprintln!(
        "crash drill: {} acknowledged before kill -9; ready again in {ready_after:?}",
        acked.len()
    );

    let (db, conn) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_rt::spawn(conn);
    for p in &acked {
        let id = p["payment_id"].as_str().unwrap();
        let row = db
            .query_opt("SELECT status, amount_captured FROM payments WHERE id = $1", &[&id])
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged payment {id} is missing after the crash"));
        assert_eq!(row.get::<_, String>(0), p["status"].as_str().unwrap(), "{id}");
        assert_eq!(row.get::<_, i64>(1), p["amount_captured"].as_i64().unwrap(), "{id}");
    }
    let twice: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT payment_id FROM journals GROUP BY payment_id, kind HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 0, "a journal was posted twice");
    let verify = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(["--config", payrail::config::repo_config_path(), "ledger", "verify"])
        .env("PAYRAIL__DATABASE__URL", &database_url)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    restarted.child.kill().unwrap();
    let _ = restarted.child.wait();
    crate::helpers::drop_database(&root, &db_name).await;
}
