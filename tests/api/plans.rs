//! The statements every payment runs cost what they write, never what their tables hold. A
//! connection plans a statement once and keeps the plan; on a new database (empty tables, no
//! statistics) the planner likes sequential scans and hash joins, and such a plan would then
//! read a whole table per batch until the next ANALYZE. So each statement's generic plan, made
//! on an empty database as a connection would make it, must probe an index for each row.

use payrail::adapters::postgres::{commit, events};

use crate::helpers::spawn_app;

/// Tables that grow with every payment or event.
const GROWING: [&str; 11] = [
    "payments",
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

/// What is wrong with a plan (`EXPLAIN (COSTS OFF)` lines), if anything: a sequential scan or
/// an index scan without a condition over a growing table, or a hash or merge join.
fn faults(plan: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in plan.iter().enumerate() {
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

    // The PSP events' look-ups, read together outside any batch.
    for (name, sql) in [
        ("processed", events::PROCESSED),
        ("references", events::PAYMENTS_OF_REFERENCES),
    ] {
        let plan = generic_plan(&client, &format!("lookup_{name}"), sql).await;
        wrong.extend(faults(&plan).into_iter().map(|f| format!("{name}: {f}")));
    }
    assert!(wrong.is_empty(), "plans that read whole tables: {wrong:#?}");
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
    let probes = plan(&[
        "Update on payments p",
        "  ->  Nested Loop",
        "        ->  Function Scan on u",
        "        ->  Index Scan using payments_pkey on payments p",
        "              Index Cond: (id = u.id)",
    ]);
    assert!(faults(&probes).is_empty(), "{:?}", faults(&probes));
}
