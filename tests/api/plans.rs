//! The statements every payment runs cost what they write, never what their tables hold. A
//! connection plans a statement once and keeps the plan; on a new database (empty tables, no
//! statistics) the planner likes sequential scans and hash joins, and such a plan would then
//! read a whole table per batch until the next ANALYZE. So each statement's generic plan, made
//! on an empty database as a connection would make it, must probe an index for each row.

use payrail::adapters::postgres::{commit, events, outbox};

use crate::helpers::spawn_app;

/// Tables that grow with every payment or event.
const GROWING: [&str; 13] = [
    "payments",
    "payment_psp_references",
    "connected_accounts",
    "psp_attempts",
    "idempotency_keys",
    "processed_events",
    "journals",
    "entries",
    "outbox",
    "payment_transitions",
    "refunds",
    "disputes",
    "payment_exceptions",
];

/// The highest `$n` a statement takes.
fn parameters(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|s| {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// What is wrong with a plan (`EXPLAIN (COSTS OFF)` lines), if anything: a sequential or bitmap
/// scan of a growing table, an index scan of one without a condition, a bitmap index scan
/// without a condition (of any table: it reads the whole index), or a hash or merge join.
fn faults(plan: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in plan.iter().enumerate() {
        // A bitmap index scan without a condition reads a whole index, whatever its table.
        if line.contains("Bitmap Index Scan on") && !plan.get(i + 1).is_some_and(|next| next.contains("Index Cond")) {
            found.push(format!("{} (no index condition)", line.trim()));
        }
        // Hash and merge joins of every kind: inner, semi, anti, left, right, full.
        let join = line.contains(" Join");
        if join && (line.contains("Hash ") || line.contains("Merge ")) {
            found.push(line.trim().to_owned());
        }
        for table in GROWING {
            let scans = |kind: &str| {
                line.contains(&format!("{kind} on {table} ")) || line.ends_with(&format!("{kind} on {table}"))
            };
            if scans("Seq Scan") || scans("Bitmap Heap Scan") {
                found.push(line.trim().to_owned());
            }
            let index_scan = (line.contains("Index Scan using") || line.contains("Index Only Scan using"))
                && (line.contains(&format!(" on {table} ")) || line.ends_with(&format!(" on {table}")));
            let conditioned = plan.get(i + 1).is_some_and(|next| next.contains("Index Cond"));
            if index_scan && !conditioned {
                found.push(format!("{} (no index condition)", line.trim()));
            }
        }
    }
    found
}

/// The generic plan of `sql` on `client`'s session, as a connection would cache it.
async fn generic_plan(client: &tokio_postgres::Client, name: &str, sql: &str) -> Vec<String> {
    client
        .batch_execute(&format!("PREPARE {name} AS {sql}"))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let nulls = vec!["NULL"; parameters(sql)].join(", ");
    let rows = client
        .query(&format!("EXPLAIN (COSTS OFF) EXECUTE {name}({nulls})"), &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

#[actix_web::test]
async fn the_statements_of_every_payment_probe_indexes_on_a_new_database() {
    let app = spawn_app().await;
    let client = app.sql().await;
    client
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let mut wrong = Vec::new();

    // A ledger batch's statements, under the settings its transaction starts with.
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute(commit::PLANNER).await.unwrap();
    for (name, sql) in commit::STATEMENTS {
        let plan = generic_plan(&client, name, sql).await;
        wrong.extend(faults(&plan).into_iter().map(|f| format!("{name}: {f}")));
    }
    client.batch_execute("ROLLBACK").await.unwrap();

    // The PSP events' look-ups, read together outside any batch, in their own transaction.
    client.batch_execute(events::LOOKUP_BEGIN).await.unwrap();
    for (name, sql) in [
        ("processed", events::PROCESSED),
        ("references", events::PAYMENTS_OF_REFERENCES),
    ] {
        let plan = generic_plan(&client, &format!("lookup_{name}"), sql).await;
        wrong.extend(faults(&plan).into_iter().map(|f| format!("{name}: {f}")));
    }
    client.batch_execute("ROLLBACK").await.unwrap();

    // The outbox relay's read, in a round's transaction after the round's first statement.
    client.batch_execute("BEGIN").await.unwrap();
    client.query_one(outbox::RELAY_BEGIN, &[&0i64]).await.unwrap();
    let plan = generic_plan(&client, "relay", outbox::RELAY_READ).await;
    wrong.extend(faults(&plan).into_iter().map(|f| format!("relay: {f}")));
    // Walked in the cursor's order, not sorted: the limit bounds what a round reads.
    if plan.iter().any(|l| l.contains("Sort")) {
        wrong.push(format!("relay: sorted {plan:?}"));
    }
    client.batch_execute("ROLLBACK").await.unwrap();
    assert!(wrong.is_empty(), "plans that read whole tables: {wrong:#?}");
}

/// Runs each statement `times` times (every array NULL: no rows) in one transaction opened by
/// `begin`, and returns those PostgreSQL planned for their parameters (custom plans) instead of
/// running the plan it keeps.
async fn custom_planned(
    client: &tokio_postgres::Client,
    begin: &str,
    statements: &[(&str, &str)],
    times: usize,
) -> Vec<String> {
    client.batch_execute(begin).await.unwrap();
    for (name, sql) in statements {
        client
            .batch_execute(&format!("PREPARE custom_{name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let nulls = vec!["NULL"; parameters(sql)].join(", ");
        for _ in 0..times {
            client
                .batch_execute(&format!("EXECUTE custom_{name}({nulls})"))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    let planned = client
        .query(
            "SELECT name, custom_plans FROM pg_prepared_statements WHERE name LIKE 'custom\\_%' AND custom_plans > 0",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{}: {} custom plans", r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    client.batch_execute("ROLLBACK; DEALLOCATE ALL").await.unwrap();
    planned
}

/// A batch's statements and the look-ups run the plan their connection keeps, from the first
/// execution on: left to choose, PostgreSQL plans a statement that joins the batch's arrays
/// afresh for every batch (a custom plan, which knows the arrays' lengths, is always priced
/// below the generic one), and planning cost more than running.
#[actix_web::test]
async fn a_batch_and_a_look_up_never_plan_their_statements_again() {
    let app = spawn_app().await;
    let client = app.sql().await;
    let batch = format!("BEGIN; {}", commit::PLANNER);
    let planned = custom_planned(&client, &batch, commit::STATEMENTS, 8).await;
    assert!(planned.is_empty(), "a batch's statements planned again: {planned:?}");
    let lookups = [
        ("processed", events::PROCESSED),
        ("references", events::PAYMENTS_OF_REFERENCES),
    ];
    let planned = custom_planned(&client, events::LOOKUP_BEGIN, &lookups, 8).await;
    assert!(planned.is_empty(), "look-ups planned again: {planned:?}");
    // A relay round's read, after the round's first statement.
    let relay = format!("BEGIN; {}", outbox::RELAY_BEGIN.replace("$1", "0"));
    let planned = custom_planned(&client, &relay, &[("relay", outbox::RELAY_READ)], 8).await;
    assert!(planned.is_empty(), "the relay's read planned again: {planned:?}");
    // The counter counts: without the setting, the first executions are planned for their
    // parameters.
    let planned = custom_planned(&client, "BEGIN", &lookups, 8).await;
    assert!(!planned.is_empty(), "custom plans are not seen at all");
}

/// A table with any BEFORE UPDATE row trigger has each row an UPDATE touches locked before the
/// trigger is called, whatever its column list and condition then decide: a WAL record and a
/// second write of the row's header per update. The tables a batch updates (by UPDATE or by
/// `ON CONFLICT … DO UPDATE`) keep their row checks in AFTER triggers (migration V26).
#[actix_web::test]
async fn no_table_a_batch_updates_locks_its_rows_for_a_before_trigger() {
    let app = spawn_app().await;
    let client = app.sql().await;
    let mut updated: Vec<String> = commit::STATEMENTS
        .iter()
        .filter_map(|(_, sql)| {
            let sql = sql.trim_start();
            let table = match sql.strip_prefix("UPDATE ") {
                Some(rest) => rest,
                None if sql.contains("DO UPDATE") => sql.strip_prefix("INSERT INTO ")?,
                None => return None,
            };
            table.split_whitespace().next().map(str::to_owned)
        })
        .collect();
    updated.sort();
    updated.dedup();
    for table in ["payments", "psp_attempts", "idempotency_keys", "ledger_accounts"] {
        assert!(updated.iter().any(|t| t == table), "{table} is not among {updated:?}");
    }
    // tgtype: 1 row, 2 before, 16 update.
    let before: Vec<String> = client
        .query(
            "SELECT c.relname || '.' || t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             WHERE NOT t.tgisinternal AND t.tgtype & 19 = 19 AND c.relname = ANY($1) ORDER BY 1",
            &[&updated],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(before.is_empty(), "BEFORE UPDATE row triggers: {before:?}");
}

#[test]
fn a_plan_that_reads_a_whole_table_is_found() {
    let plan = |lines: &[&str]| lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let hashed = plan(&[
        "Update on payments p",
        "  ->  Hash Join",
        "        ->  Seq Scan on payments p",
        "        ->  Hash",
    ]);
    assert_eq!(faults(&hashed).len(), 2, "{:?}", faults(&hashed));
    let anti = plan(&["  ->  Hash Anti Join", "  ->  Merge Left Join"]);
    assert_eq!(faults(&anti).len(), 2, "{:?}", faults(&anti));
    let whole_index = plan(&[
        "Update on psp_attempts a",
        "  ->  Nested Loop",
        "        ->  Index Scan using psp_attempts_open on psp_attempts a",
        "              Filter: (outcome IS NULL)",
    ]);
    assert_eq!(faults(&whole_index).len(), 1, "{:?}", faults(&whole_index));
    // A stale plan seen under load: every payment read, for a batch's audit trail.
    let whole_bitmap = plan(&[
        "  ->  Nested Loop Anti Join",
        "        Join Filter: (p.id = n.payment_id)",
        "        ->  Named Tuplestore Scan",
        "        ->  Materialize",
        "              ->  Bitmap Heap Scan on payments p",
        "                    ->  Bitmap Index Scan on payments_merchant_created",
    ]);
    assert_eq!(faults(&whole_bitmap).len(), 2, "{:?}", faults(&whole_bitmap));
    let whole_small_index = plan(&[
        "  ->  Bitmap Heap Scan on merchants m",
        "        ->  Bitmap Index Scan on merchants_pkey",
    ]);
    assert_eq!(faults(&whole_small_index).len(), 1, "{:?}", faults(&whole_small_index));
    let probes = plan(&[
        "Update on payments p",
        "  ->  Nested Loop",
        "        ->  Function Scan on u",
        "        ->  Index Scan using payments_pkey on payments p",
        "              Index Cond: (id = u.id)",
    ]);
    assert!(faults(&probes).is_empty(), "{:?}", faults(&probes));
}

/// A session whose every statement's plan, nested ones included (the triggers' queries), comes
/// back as a notice: `auto_explain` with `client_min_messages = log`.
async fn explaining_session(
    app: &crate::helpers::TestApp,
) -> (tokio_postgres::Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let config: tokio_postgres::Config = app.database_url.parse().expect("database url");
    let (client, mut conn) = config.connect(tokio_postgres::NoTls).await.expect("connect");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = notices.clone();
    actix_rt::spawn(async move {
        while let Some(message) = futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notice(n)) => sink.lock().unwrap().push(n.message().to_owned()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_analyze = off;
             SET client_min_messages = log;
             SET plan_cache_mode = force_generic_plan;",
        )
        .await
        .expect("auto_explain");
    (client, notices)
}

/// The triggers a payment's batch fires (the audit trail's payment check, the entries' balance
/// and journal checks, the sellers' pending funds, the references of payments, attempts,
/// journals, the record of a payment's PSP reference, and the deferred per-journal check at commit) plan their queries once per session and keep the plan. Planned on
/// a new database, each must still probe an index per row: a plan that reads a whole table (a
/// bitmap scan over a whole index is one) would then run on every batch as the table grows.
#[actix_web::test]
async fn the_triggers_of_every_payment_probe_indexes_on_a_new_database() {
    const ROWS: i32 = 60;
    // A batch's worth of transitions.
    const BATCH: usize = 16;
    let app = spawn_app().await;
    let p = app.pay(5000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (client, notices) = explaining_session(&app).await;
    client.batch_execute("BEGIN").await.unwrap();
    // Tables of a few pages, as a node's sessions find them in the first seconds of a new
    // database.
    client
        .execute(
            "INSERT INTO payments SELECT (jsonb_populate_record(p, jsonb_build_object(
                 'id', 'pay_plan' || g, 'psp_reference', NULL))).*
             FROM payments p, generate_series(1, $2::int) g WHERE p.id = $1",
            &[&p, &ROWS],
        )
        .await
        .unwrap();
    // Statistics of tables this small, as autovacuum's first ANALYZE of a new database leaves
    // them: here whole-table plans look cheapest, and a session keeps what it planned.
    client.batch_execute("ANALYZE").await.unwrap();

    client
        .execute(
            "INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at)
             SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])",
            &[
                &vec![p.clone(); BATCH],
                &(100..100 + BATCH as i32).collect::<Vec<_>>(),
                &vec!["captured"; BATCH],
                &vec!["captured"; BATCH],
                &vec!["test.plan"; BATCH],
                &vec![chrono::Utc::now(); BATCH],
            ],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
             SELECT 'jr_plan', id, merchant_id, 'refund', 'plan', currency, now() FROM payments WHERE id = $1",
            &[&p],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO entries (journal_id, account, currency, debit, credit)
             SELECT * FROM unnest(ARRAY['jr_plan', 'jr_plan'], ARRAY['psp_clearing', 'seller_pending:acct_x'],
                                  ARRAY['USD', 'USD'], ARRAY[100, 0]::bigint[], ARRAY[0, 100]::bigint[]);
             INSERT INTO outbox (merchant_id, payment_id, event_type, body)
             SELECT merchant_id, id, 'payment.plan', '{}' FROM payments WHERE id = '$p';
             INSERT INTO psp_attempts (id, payment_id, operation, amount, started_at)
             SELECT 'att_plan' || g, '$p', 'capture', 100, now() FROM generate_series(1, 16) g;
             UPDATE payments SET psp_reference = psp_reference || '_plan' WHERE id = '$p';
             SET CONSTRAINTS ALL IMMEDIATE;"
                .replace("$p", &p)
                .as_str(),
        )
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();

    let plans = notices.lock().unwrap().clone();
    let nested = |fragment: &str| plans.iter().any(|p| p.contains(fragment));
    // Each trigger's query was planned and seen.
    for fragment in [
        "FROM new_transitions",
        "FROM new_entries",
        "FROM new_payments",
        "FROM new_attempts",
        "FROM new_journals",
        "INSERT INTO payment_psp_references",
        "INSERT INTO seller_pending_funds",
        "FROM entries WHERE journal_id = NEW.id",
    ] {
        assert!(nested(fragment), "no plan seen for {fragment:?} in {plans:#?}");
    }
    let mut wrong = Vec::new();
    for plan in &plans {
        let lines: Vec<String> = plan.lines().map(str::to_owned).collect();
        let text = lines
            .iter()
            .find(|l| l.contains("Query Text"))
            .cloned()
            .unwrap_or_default();
        wrong.extend(faults(&lines).into_iter().map(|f| format!("{}: {f}", text.trim())));
    }
    assert!(wrong.is_empty(), "trigger plans that read whole tables: {wrong:#?}");
}
