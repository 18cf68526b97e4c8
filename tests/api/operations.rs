//! The operator's view: metrics, actor inspection, supervision, bounded mailboxes, request ids.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use payrail::adapters::postgres::SetupError;
use payrail::adapters::psp::sandbox::{LEDGER_PANIC_ONCE, PANIC_ONCE};
use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, DEMO_KEY};

#[actix_web::test]
async fn a_panic_in_a_payment_handler_is_a_503_and_the_actor_restarts_from_postgres() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "o", "amount": { "value": 900, "currency": "USD" }, "payment_method": PANIC_ONCE, "confirm": true }).to_string();
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("panic-1"), Some(&body))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    assert_eq!(
        app.state
            .registry
            .stats
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    let text = String::from_utf8_lossy(&metrics.raw);
    assert!(
        text.contains("payrail_actor_restarts_total{actor=\"payment\"} 1"),
        "{text}"
    );
    // The key was released; the retry meets a fresh incarnation that completes the attempt.
    let r = app
        .request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("panic-1"), Some(&body))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("captured")),
        "{}",
        r.body
    );
    assert_eq!(app.count("journals").await, 1);
}

#[actix_web::test]
async fn a_panic_in_a_ledger_batch_refuses_its_commits_and_the_shard_goes_on() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "ledger-drill", "amount": { "value": 900, "currency": "USD" },
                       "payment_method": LEDGER_PANIC_ONCE, "confirm": true })
    .to_string();
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("ledger-panic"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("dependency_unavailable")),
        "{}",
        r.body
    );
    assert_eq!(
        app.state
            .ledger
            .kind
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(app.count("payments").await, 0, "the panicked batch rolled back");
    // The same shard serves the retry and everything after it.
    let r = app
        .request(
            "POST",
            "/api/v1/payments",
            Some(DEMO_KEY),
            Some("ledger-panic"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("captured")),
        "{}",
        r.body
    );
    assert_eq!(app.pay(100, "pm_card_visa", "automatic", true).await.status, 201);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn a_full_mailbox_answers_503_at_once_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.actors.mailbox_capacity = 2;
        c.psp.sandbox.latency_ms = 400;
    })
    .await;
    let p = app.pay(1000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/payments/{p}/capture");
    let timed = (0..10).map(|i| {
        let (app, path) = (&app, path.clone());
        async move {
            let started = Instant::now();
            let r = app
                .request("POST", &path, Some(DEMO_KEY), Some(&format!("full-{i}")), Some("{}"))
                .await;
            (r, started.elapsed())
        }
    });
    let results = join_all(timed).await;
    let full: Vec<_> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert!(
        !full.is_empty(),
        "{:?}",
        results.iter().map(|(r, _)| r.status).collect::<Vec<_>>()
    );
    for (r, took) in &full {
        assert_eq!(r.body["error"]["code"], "dependency_unavailable");
        assert_eq!(r.headers.get("retry-after").unwrap(), "1");
        assert!(
            *took < Duration::from_millis(350),
            "a full mailbox must not make callers wait: {took:?}"
        );
    }
    assert_eq!(
        results.iter().filter(|(r, _)| r.status == 200).count(),
        1,
        "exactly one capture"
    );
}

#[actix_web::test]
async fn metrics_name_every_kind_and_carry_no_ids() {
    let app = spawn_app().await;
    let p = app.pay(1000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.request("POST", "/api/v1/payments", Some(DEMO_KEY), Some("dup"), Some("{}"))
        .await;
    let r = app.request("GET", "/metrics", None, None, None).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.raw);
    for needle in [
        "payrail_actor_mailbox_depth{actor=\"payment\"}",
        "payrail_actor_mailbox_depth{actor=\"ledger_shard\"}",
        "payrail_actors_live{actor=\"payment\"} 1",
        "payrail_actors_live{actor=\"ledger_shard\"} 4",
        "payrail_actor_restarts_total{actor=\"payment\"} 0",
        "payrail_actor_handle_duration_seconds_count{actor=\"payment\"}",
        "payrail_actor_handle_duration_seconds_count{actor=\"ledger_shard\"}",
        "payrail_http_request_duration_seconds_count{route=\"/api/v1/payments\",status=\"201\"}",
        "payrail_psp_request_duration_seconds_count{psp=\"sandbox\",operation=\"authorize\"} 1",
        "# TYPE payrail_psp_events counter",
        "payrail_ledger_batch_size_count",
        "payrail_ledger_commit_duration_seconds_bucket{le=",
        // The create's key was claimed by its payment's first commit, not by a claim.
        "payrail_idempotency_claim_duration_seconds_count 0\n",
        "payrail_payment_commit_duration_seconds_count{kind=\"attempt_start\"} 1\n",
        "payrail_payment_commit_duration_seconds_count{kind=\"psp_answer\"} 1\n",
        "payrail_payment_transitions_total{from=\"pending\",to=\"captured\"} 1",
        "payrail_db_pool_connections{state=\"in_use\"}",
        "payrail_psp_consumer_pending ",
        "payrail_psp_consumer_redelivered ",
        "payrail_actors_live{actor=\"event_consumer\"} 8",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    // A real parser agrees: the Prometheus project's strict OpenMetrics parser.
    // Bounded: the checker's first run builds its venv from PyPI.
    let mut check = std::process::Command::new("timeout")
        .args(["--kill-after=5", "600", "python3"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/checks/openmetrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), &r.raw).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let with_ids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&p) || l.contains("\"pay_") || l.contains("\"mer_"))
        .collect();
    assert!(with_ids.is_empty(), "ids must not be labels: {with_ids:?}");
}

#[actix_web::test]
async fn operators_see_the_deepest_actors_and_one_actor_in_detail() {
    let app = spawn_app().await;
    let token = app.state.config.admin.token.clone();
    let p = app.pay(1000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.post(&format!("/api/v1/payments/{p}/capture"), json!({})).await;

    assert_eq!(
        app.request("GET", "/admin/v1/actors", None, None, None).await.status,
        401
    );
    assert_eq!(
        app.request("GET", "/admin/v1/actors", Some(DEMO_KEY), None, None)
            .await
            .status,
        401
    );
    let r = app
        .request("GET", "/admin/v1/actors?kind=payment&top=20", Some(&token), None, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let actor = &r.body["actors"][0];
    assert_eq!(
        (actor["kind"].as_str(), actor["id"].as_str(), actor["status"].as_str()),
        (Some("payment"), Some(p.as_str()), Some("captured"))
    );
    assert_eq!(actor["mailbox_depth"], 0);
    assert!(actor["last_message_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r.body["totals"]["payment"], json!({ "live": 1, "mailbox_depth": 0 }));
    assert_eq!(r.body["totals"]["ledger_shard"]["live"], 4);
    let r = app
        .request("GET", "/admin/v1/actors?top=0", Some(&token), None, None)
        .await;
    assert_eq!(r.status, 400);

    let r = app
        .request(
            "GET",
            &format!("/admin/v1/actors/payment/{p}"),
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["state"]["status"], "captured");
    assert_eq!(r.body["live"], true);
    // The sandbox's own webhooks arrive as psp_event messages too, whenever they do.
    let types: Vec<&str> = r.body["recent_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .filter(|t| *t != "psp_event")
        .collect();
    assert_eq!(types, ["create", "capture"], "creation goes through the actor too");
    let r = app
        .request(
            "GET",
            "/admin/v1/actors/ledger_shard/ledger_shard-0",
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!((r.status, r.body["kind"].as_str()), (200, Some("ledger_shard")));
    let r = app
        .request("GET", "/admin/v1/actors/payment/pay_nothing", Some(&token), None, None)
        .await;
    assert_eq!(r.status, 404);

    // The live page is served, and reads the JSON above.
    let page = app.request("GET", "/admin/", None, None, None).await;
    let html = String::from_utf8_lossy(&page.raw);
    assert_eq!(page.status, 200);
    assert!(html.contains("/admin/v1/actors?top=20") && html.contains("mailbox_depth") && !html.contains("https://"));
}

#[actix_web::test]
async fn the_request_id_is_echoed_or_made() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/healthz", app.address))
        .insert_header(("Request-Id", "abc-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("request-id").unwrap(), "abc-123");
    let r = app.client.get(format!("{}/healthz", app.address)).send().await.unwrap();
    assert!(r
        .headers()
        .get("request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let r = app
        .client
        .get(format!("{}/healthz", app.address))
        .insert_header(("Request-Id", "bad id with spaces"))
        .send()
        .await
        .unwrap();
    assert!(r
        .headers()
        .get("request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("req_"));
}

#[actix_web::test]
async fn a_migration_runs_under_its_own_timeouts_not_the_pools() {
    let app = spawn_app().await;
    let db = &app.state.db;
    // What a migration sees of its bounds, kept in a table of its own; the pool's 5 s
    // statement_timeout would stop a long index build on a large database.
    let probe = "CREATE TABLE migration_probe AS
        SELECT current_setting('statement_timeout') AS statement_timeout,
               current_setting('lock_timeout') AS lock_timeout";
    assert_eq!(db.apply_migrations(&[(9001, "probe", probe)]).await.unwrap(), [9001]);
    assert!(db.apply_migrations(&[(9001, "probe", probe)]).await.unwrap().is_empty());
    let sql = app.sql().await;
    let row = sql
        .query_one("SELECT statement_timeout, lock_timeout FROM migration_probe", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("1h".to_owned(), "10s".to_owned())
    );
}

#[actix_web::test]
async fn a_migration_recorded_under_another_name_stops_the_process() {
    let app = spawn_app().await;
    let db = &app.state.db;
    assert_eq!(
        db.apply_migrations(&[(9003, "first", "CREATE TABLE renamed_probe (n int)")])
            .await
            .unwrap(),
        [9003]
    );
    // A build whose migrations were renumbered: its 9003 is another migration, and the others
    // were written against that one, so none may run, not even one numbered before it that
    // the database lacks.
    let err = db
        .apply_migrations(&[
            (9002, "before it", "CREATE TABLE before_renamed (n int)"),
            (9003, "second", "SELECT 1"),
            (9004, "after it", "CREATE TABLE after_renamed (n int)"),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SetupError::MigrationMismatch { version: 9003, recorded, expected }
            if recorded == "first" && expected == "second"),
        "{err}"
    );
    let sql = app.sql().await;
    let untouched = sql
        .query_one(
            "SELECT to_regclass('before_renamed') IS NULL AND to_regclass('after_renamed') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(untouched.get::<_, bool>(0), "nothing ran beside the mismatch");
    // The lock is given back: the right list still applies.
    assert_eq!(
        db.apply_migrations(&[(9003, "first", "unused"), (9004, "after it", "SELECT 1")])
            .await
            .unwrap(),
        [9004]
    );
}

#[actix_web::test]
async fn a_process_starting_while_another_migrates_waits_past_the_pools_timeout() {
    let app = spawn_app_with(|c| c.database.statement_timeout_ms = 1_000).await;
    // Another process holds the migrations' lock for longer than any statement of the pool
    // may run: a blocking wait for it would be cut off by the statement_timeout.
    let other = app.sql().await;
    other.batch_execute("SELECT pg_advisory_lock(7423001)").await.unwrap();
    let started = Instant::now();
    let migrate = actix_rt::spawn({
        let db = app.state.db.clone();
        async move { db.apply_migrations(&[(9002, "after the other", "SELECT 1")]).await }
    });
    actix_rt::time::sleep(Duration::from_millis(1_800)).await;
    assert!(!migrate.is_finished(), "it waits while the other holds the lock");
    other.batch_execute("SELECT pg_advisory_unlock(7423001)").await.unwrap();
    let applied = migrate.await.unwrap().unwrap();
    assert_eq!(applied, [9002]);
    assert!(started.elapsed() >= Duration::from_millis(1_800));
}

/// The swap V28 waits for, if any: when the waiting transaction began, to tell one try from the
/// next.
async fn waiting_swap(sql: &tokio_postgres::Client) -> Option<String> {
    sql.query_opt(
        "SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.relation = 'entries'::regclass AND l.mode = 'AccessExclusiveLock' AND NOT l.granted",
        &[],
    )
    .await
    .unwrap()
    .map(|row| row.get(0))
}

/// Back to V27's entries: the key on `id` and the index on `journal_id`.
const ENTRIES_BEFORE_V28: &str =
    "ALTER TABLE entries DROP CONSTRAINT entries_pkey, ADD CONSTRAINT entries_pkey PRIMARY KEY (id);
     CREATE INDEX entries_journal ON entries (journal_id);
     DELETE FROM payrail_migrations WHERE version = 28";

async fn entries_key(sql: &tokio_postgres::Client) -> Vec<String> {
    sql.query_one(
        "SELECT array_agg(a.attname::text ORDER BY k.n)
         FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, n), pg_attribute a
         WHERE i.indexrelid = 'entries_pkey'::regclass AND a.attrelid = i.indrelid AND a.attnum = k.attnum",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// V28 builds the entries' new key CONCURRENTLY: a writer is not held up while it is built, and
/// its last step (the swap, which needs the table to itself) waits at most a second at a time,
/// then tries again.
#[actix_web::test]
async fn the_entries_key_is_built_while_writers_go_on() {
    use payrail::adapters::postgres::MIGRATIONS;

    let app = spawn_app().await;
    for _ in 0..3 {
        assert_eq!(app.pay(1_000, "pm_card_visa", "automatic", true).await.status, 201);
    }
    let sql = app.sql().await;
    let entries: i64 = sql.query_one("SELECT count(*) FROM entries", &[]).await.unwrap().get(0);
    assert!(entries >= 9, "three captured payments, three entries each: {entries}");
    sql.batch_execute(ENTRIES_BEFORE_V28).await.unwrap();
    assert_eq!(entries_key(&sql).await, ["id"]);

    // A writer in the middle of its transaction, and a reader in the middle of its own.
    let writer = app.sql().await;
    writer
        .batch_execute("BEGIN; LOCK TABLE entries IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let reader = app.sql().await;
    reader
        .batch_execute("BEGIN; LOCK TABLE entries IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let migrate = actix_rt::spawn({
        let db = app.state.db.clone();
        async move { db.apply_migrations(MIGRATIONS).await }
    });
    // The build waits for the writer to finish...
    crate::events::wait_for("the index build to wait for the writer", async || {
        sql.query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
               AND query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    // ...and holds up no other writer meanwhile.
    let other = app.sql().await;
    other
        .batch_execute("SET lock_timeout = '2s'; BEGIN; LOCK TABLE entries IN ROW EXCLUSIVE MODE; COMMIT")
        .await
        .expect("a writer goes on while the key is built");
    writer.batch_execute("COMMIT").await.unwrap();

    // The swap waits for the reader, gives up after its second, and tries again.
    let mut first = None;
    crate::events::wait_for("the swap to wait for the reader", async || {
        first = waiting_swap(&sql).await;
        first.is_some()
    })
    .await;
    crate::events::wait_for("the swap to be tried again", async || {
        waiting_swap(&sql).await.is_some_and(|t| Some(t) != first)
    })
    .await;
    assert!(
        !migrate.is_finished(),
        "a busy table is tried again, not a failed start"
    );
    reader.batch_execute("COMMIT").await.unwrap();
    assert_eq!(migrate.await.unwrap().unwrap(), [28]);
    assert_eq!(entries_key(&sql).await, ["journal_id", "id"]);
    let gone = sql
        .query_one(
            "SELECT to_regclass('entries_journal') IS NULL AND to_regclass('entries_journal_id_key') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(gone.get::<_, bool>(0), "one index where there were two");

    // What a start that died or gave up left under the new key's name: a build that did not
    // finish (PostgreSQL marks it invalid) or an index that is not the key is dropped and the key
    // built again; a finished build is kept, not built again.
    for (left, kept) in [
        (
            "CREATE UNIQUE INDEX entries_journal_id_key ON entries (journal_id, id);
             UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'entries_journal_id_key'::regclass",
            false,
        ),
        ("CREATE INDEX entries_journal_id_key ON entries (id)", false),
        (
            "CREATE UNIQUE INDEX entries_journal_id_key ON entries (journal_id, id)",
            true,
        ),
    ] {
        sql.batch_execute(ENTRIES_BEFORE_V28).await.unwrap();
        sql.batch_execute(left).await.unwrap();
        let before: u32 = sql
            .query_one("SELECT 'entries_journal_id_key'::regclass::oid", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(app.state.db.apply_migrations(MIGRATIONS).await.unwrap(), [28]);
        assert_eq!(entries_key(&sql).await, ["journal_id", "id"], "{left}");
        let key: u32 = sql
            .query_one(
                "SELECT conindid FROM pg_constraint WHERE conname = 'entries_pkey' AND conrelid = 'entries'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(key == before, kept, "{left}");
        let valid: bool = sql
            .query_one("SELECT indisvalid FROM pg_index WHERE indexrelid = $1", &[&key])
            .await
            .unwrap()
            .get(0);
        assert!(valid, "{left}");
        let discarded = sql
            .query_one("SELECT to_regclass('entries_journal_id_key_discarded') IS NULL", &[])
            .await
            .unwrap();
        assert!(discarded.get::<_, bool>(0), "what was put aside is dropped");
    }

    // The ledger reads as before and takes new payments.
    assert_eq!(app.pay(1_000, "pm_card_visa", "automatic", true).await.status, 201);
    let after: i64 = sql.query_one("SELECT count(*) FROM entries", &[]).await.unwrap().get(0);
    assert!(after > entries, "{after} entries after {entries}");
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}
