//! One payrail node per database: a second `payrail serve` on a database another node serves
//! is refused with the holder's name, and a node whose lock another took stops serving.

use std::time::Duration;

use payrail::adapters::postgres::node_lock::NODE_LOCK_KEY;
use payrail::app::{Application, StartError};

use crate::helpers::{spawn_app, spawn_app_with, stream_prefix, test_config};

/// A second node's configuration: the first's database, its own port and streams.
fn second_node(database_url: &str, wait_ms: u64) -> payrail::config::Config {
    let mut config = test_config();
    config.database.url = database_url.to_owned();
    config.database.node_lock_wait_ms = wait_ms;
    config.nats.stream_prefix = stream_prefix();
    config
}

#[actix_web::test]
async fn a_second_node_on_the_same_database_is_refused_until_the_first_stops() {
    let first = spawn_app().await;
    let refused = match Application::build(second_node(&first.database_url, 300)).await {
        Ok(_) => panic!("a second node started on a database the first serves"),
        Err(e) => e,
    };
    assert!(matches!(refused, StartError::NodeLock(_)), "{refused}");
    let said = refused.to_string();
    assert!(said.contains("another payrail node is serving this database"), "{said}");
    // It names the holder: this test process, from where it connected.
    assert!(
        said.contains(&format!("payrail node pid {} on ", std::process::id())),
        "{said}"
    );
    assert!(said.contains("connected from 127.0.0.1 since 20"), "{said}");
    // The first was not disturbed.
    let paid = first.pay(1200, "pm_card_visa", "automatic", true).await;
    assert_eq!(paid.status, 201, "{}", paid.body);

    // Once it stops, the database is free.
    first.stop().await.unwrap();
    let url = first.database_url.clone();
    let second = spawn_app_with(move |c| c.database.url = url).await;
    let id = paid.body["payment_id"].as_str().unwrap();
    let r = second.get(&format!("/api/v1/payments/{id}")).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        r.body
    );
}

#[actix_web::test]
async fn a_node_whose_lock_another_took_stops_serving() {
    let first = spawn_app().await;
    assert_eq!(first.pay(1200, "pm_card_visa", "automatic", true).await.status, 201);
    // The node lock's session is cut (an operator, a network fault) and another process takes
    // the lock before the node can take it again. The other process queues for the lock first,
    // so PostgreSQL hands it the lock the moment the node's session ends: cutting the session
    // and then asking would race the node's own retake (on a loaded machine the node can win,
    // and the second ask would then wait for as long as the node serves).
    let taker = first.sql().await;
    let queued = actix_rt::spawn(async move {
        taker
            .batch_execute(&format!("SELECT pg_advisory_lock({NODE_LOCK_KEY})"))
            .await
            .map(|()| taker)
    });
    let other = first.sql().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_locks
                  WHERE locktype = 'advisory' AND NOT granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&NODE_LOCK_KEY],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other process never queued for the lock"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    other
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'payrail node pid %'",
        )
        .await
        .unwrap();
    let _holder = actix_rt::time::timeout(Duration::from_secs(20), queued)
        .await
        .expect("the other process gets the lock once the node's session ends")
        .unwrap()
        .unwrap();
    // The node notices, fails closed, and says why.
    let ended = first.stopped_within(Duration::from_secs(20)).await;
    let said = ended.expect_err("the node stops with an error").to_string();
    assert!(said.contains("took this database's node lock"), "{said}");
    assert!(
        first
            .client
            .get(format!("{}/healthz", first.address))
            .send()
            .await
            .is_err(),
        "the stopped node still answers"
    );
}
