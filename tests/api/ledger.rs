//! The ledger balances, provably: conservation under concurrency against a model, one journal
//! per natural key under retries, invariants enforced by PostgreSQL itself, and no half batch
//! after a kill -9.

use std::collections::HashMap;

use futures_util::future::join_all;
use payrail::domain::platform_fee;
use payrail::loadgen::zipf;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::helpers::{spawn_app, TestApp, DEMO_KEY};

/// What the ledger must hold, computed by the test from what the API acknowledged.
#[derive(Default, Debug)]
struct Model {
    payable: HashMap<String, i64>,
    fees: i64,
    clearing: i64,
}

/// The demo merchant's key and `n - 1` new merchants' keys.
async fn merchants(app: &TestApp, n: usize) -> Vec<String> {
    let mut out = vec![DEMO_KEY.to_owned()];
    for _ in 1..n {
        out.push(app.new_merchant().await);
    }
    out
}

#[actix_web::test]
async fn money_is_conserved_under_concurrent_captures_and_refunds_across_skewed_merchants() {
    let app = spawn_app().await;
    let keys = merchants(&app, 6).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = Model::default();

    // Round 1: payments, half captured automatically, half authorized then partly captured.
    let plans: Vec<(usize, i64, bool, i64)> = (0..600)
        .map(|_| {
            let amount = rng.gen_range(100..50_000);
            (
                zipf(&mut rng, keys.len()),
                amount,
                rng.gen_bool(0.5),
                rng.gen_range(1..=amount),
            )
        })
        .collect();
    let mut captured: Vec<(usize, String, i64)> = Vec::new();
    for chunk in plans.chunks(48) {
        let results = join_all(chunk.iter().map(|(m, amount, automatic, partial)| {
            let app = &app;
            let key = keys[*m].clone();
            async move {
                let body = json!({ "order_id": "o", "amount": { "value": amount, "currency": "USD" },
                    "payment_method": "pm_card_visa", "capture_strategy": if *automatic { "automatic" } else { "manual" },
                    "confirm": true });
                let idem = uuid::Uuid::new_v4().to_string();
                let r = app.request("POST", "/api/v1/payments", Some(&key), Some(&idem), Some(&body.to_string())).await;
                assert_eq!(r.status, 201, "{}", r.body);
                let id = r.body["payment_id"].as_str().unwrap().to_owned();
                if *automatic {
                    return (id, *amount);
                }
                let body = json!({ "amount": { "value": partial, "currency": "USD" } }).to_string();
                let idem = uuid::Uuid::new_v4().to_string();
                let r = app.request("POST", &format!("/api/v1/payments/{id}/capture"), Some(&key), Some(&idem), Some(&body)).await;
                assert_eq!(r.status, 200, "{}", r.body);
                (id, *partial)
            }
        }))
        .await;
        for ((m, ..), (id, amount)) in chunk.iter().zip(results) {
            captured.push((*m, id, amount));
        }
    }
    for (m, _, amount) in &captured {
        let fee = platform_fee(*amount, 290, 30);
        *model.payable.entry(keys[*m].clone()).or_default() += amount - fee;
        model.fees += fee;
        model.clearing += amount;
    }

    // Round 2: up to three concurrent refunds per payment, some of them too large.
    let refunds: Vec<(usize, String, i64)> = captured
        .iter()
        .flat_map(|(m, id, amount)| {
            let n = rng.gen_range(0..=3);
            (0..n)
                .map(|_| (*m, id.clone(), rng.gen_range(1..=*amount)))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut refunded: HashMap<String, i64> = HashMap::new();
    for chunk in refunds.chunks(48) {
        let results = join_all(chunk.iter().map(|(m, id, amount)| {
            let (app, key) = (&app, keys[*m].clone());
            async move {
                let body = json!({ "amount": { "value": amount, "currency": "USD" } }).to_string();
                let idem = uuid::Uuid::new_v4().to_string();
                app.request(
                    "POST",
                    &format!("/api/v1/payments/{id}/refunds"),
                    Some(&key),
                    Some(&idem),
                    Some(&body),
                )
                .await
            }
        }))
        .await;
        for ((m, id, amount), r) in chunk.iter().zip(results) {
            match r.status {
                201 => {
                    assert_eq!(r.body["status"], "succeeded");
                    *model.payable.get_mut(&keys[*m]).unwrap() -= amount;
                    model.clearing -= amount;
                    *refunded.entry(id.clone()).or_default() += amount;
                }
                400 => assert_eq!(r.body["error"]["code"], "amount_too_large"),
                other => panic!("refund answered {other}: {}", r.body),
            }
        }
    }
    assert!(refunded.len() > 100, "the run refunded enough to mean something");

    // Every payment's own numbers agree with what was acknowledged.
    for (_, id, amount) in captured.iter().take(200) {
        let p = app.get_as(&keys, id).await;
        assert_eq!(p["amount_captured"], *amount);
        assert_eq!(p["amount_refunded"], refunded.get(id).copied().unwrap_or(0));
    }
    // The ledger balances, and every stored balance is the sum of its entries.
    let report = app.state.db.verify_ledger().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.journals as usize >= captured.len() + refunded.len());
    // Each merchant's balance is what the model says; the platform got exactly the fees.
    for key in &keys {
        let b = app.request("GET", "/api/v1/balance", Some(key), None, None).await.body;
        let payable = b["balances"][0]["payable"].as_i64().unwrap_or(0);
        assert_eq!(payable, model.payable.get(key).copied().unwrap_or(0), "{key}");
    }
    let db = app.sql().await;
    let sum = |account: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one("SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts WHERE account = $1", &[&account])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    assert_eq!(sum("platform_fee_revenue").await, model.fees);
    assert_eq!(-sum("psp_clearing").await, model.clearing);
}

#[actix_web::test]
async fn a_lost_acknowledgement_retried_with_the_same_key_posts_one_journal() {
    let app = spawn_app().await;
    let p = app.pay(5000, "pm_card_visa", "manual", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/payments/{p}/capture");
    // The first answer is lost on the way back; the client retries, twice at once.
    let _lost = app
        .request("POST", &path, Some(DEMO_KEY), Some("cap-lost"), Some("{}"))
        .await;
    let retries =
        join_all((0..2).map(|_| app.request("POST", &path, Some(DEMO_KEY), Some("cap-lost"), Some("{}")))).await;
    for r in retries {
        assert_eq!((r.status, r.body["status"].as_str()), (200, Some("captured")));
        assert_eq!(r.headers.get("idempotent-replayed").unwrap(), "true");
    }
    let db = app.sql().await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM journals WHERE payment_id = $1", &[&p])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// A payment of 50.00 captured at once: its id and its merchant's.
async fn captured_payment(app: &TestApp) -> (String, String) {
    let body = app.pay(5000, "pm_card_visa", "automatic", true).await.body;
    let id = |field: &str| body[field].as_str().unwrap().to_owned();
    (id("payment_id"), id("merchant_id"))
}

/// A payment's PSP reference is recorded by the database as the payment's row is written
/// (migration V24), whoever writes it, and names that payment for good: no other payment can be
/// given it, and no record can be changed, deleted or truncated.
#[actix_web::test]
async fn a_psp_reference_names_one_payment_for_good() {
    use tokio_postgres::error::SqlState;
    let app = spawn_app().await;
    let (p, _) = captured_payment(&app).await;
    let db = app.sql().await;
    let row = db
        .query_one("SELECT psp, psp_reference FROM payments WHERE id = $1", &[&p])
        .await
        .unwrap();
    let (psp, reference): (String, String) = (row.get(0), row.get(1));
    let named = |reference: String| {
        let (db, psp) = (&db, psp.clone());
        async move {
            db.query(
                "SELECT payment_id FROM payment_psp_references WHERE psp = $1 AND psp_reference = $2",
                &[&psp, &reference],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };
    // Recorded by payrail's own commit.
    assert_eq!(named(reference.clone()).await, std::slice::from_ref(&p));
    // Another payment, a copy of the first written in SQL with a reference of its own: recorded
    // too.
    db.batch_execute(&format!(
        "INSERT INTO payments SELECT (jsonb_populate_record(p, jsonb_build_object(
             'id', 'pay_other', 'psp_reference', 'pi_other'))).*
         FROM payments p WHERE p.id = '{p}'"
    ))
    .await
    .unwrap();
    assert_eq!(named("pi_other".into()).await, ["pay_other"]);
    for (case, sql, code) in [
        (
            "the first payment's reference given to the other",
            format!("UPDATE payments SET psp_reference = '{reference}' WHERE id = 'pay_other'"),
            SqlState::UNIQUE_VIOLATION,
        ),
        (
            "the first payment's reference recorded for the other",
            format!(
                "INSERT INTO payment_psp_references (psp, psp_reference, payment_id)
                 VALUES ('{psp}', '{reference}', 'pay_other')"
            ),
            SqlState::UNIQUE_VIOLATION,
        ),
        (
            "a reference moved to another payment",
            format!("UPDATE payment_psp_references SET payment_id = 'pay_other' WHERE payment_id = '{p}'"),
            SqlState::INSUFFICIENT_PRIVILEGE,
        ),
        (
            "a reference deleted",
            format!("DELETE FROM payment_psp_references WHERE payment_id = '{p}'"),
            SqlState::INSUFFICIENT_PRIVILEGE,
        ),
        (
            "the references truncated",
            "TRUNCATE payment_psp_references".to_owned(),
            SqlState::INSUFFICIENT_PRIVILEGE,
        ),
    ] {
        let err = db.batch_execute(&sql).await.expect_err(case);
        assert_eq!(err.code(), Some(&code), "{case}: {err}");
    }
    // Writing a payment again with the reference it has records nothing more, one given back a
    // reference it had is not refused, and a new one is recorded beside the old.
    db.batch_execute(&format!(
        "UPDATE payments SET psp_reference = 'pi_other' WHERE id = 'pay_other';
         UPDATE payments SET psp = 'elsewhere' WHERE id = 'pay_other';
         UPDATE payments SET psp = '{psp}' WHERE id = 'pay_other';
         UPDATE payments SET psp_reference = 'pi_other_2' WHERE id = 'pay_other';"
    ))
    .await
    .unwrap();
    assert_eq!(named("pi_other".into()).await, ["pay_other"]);
    assert_eq!(named("pi_other_2".into()).await, ["pay_other"]);
    // An insert that ends as nothing records nothing (migration V26: before it, the trigger ran
    // ahead of the conflict's arbitration); one that ends as an update records what it wrote.
    let again = |reference: &str, action: &str| {
        format!(
            "INSERT INTO payments SELECT (jsonb_populate_record(p, jsonb_build_object(
                 'psp_reference', '{reference}'))).*
             FROM payments p WHERE p.id = 'pay_other' ON CONFLICT (id) DO {action}"
        )
    };
    db.batch_execute(&again("pi_never", "NOTHING")).await.unwrap();
    assert!(named("pi_never".into()).await.is_empty());
    db.batch_execute(&again(
        "pi_other_3",
        "UPDATE SET psp_reference = excluded.psp_reference",
    ))
    .await
    .unwrap();
    assert_eq!(named("pi_other_3".into()).await, ["pay_other"]);
    assert_eq!(named(reference).await, std::slice::from_ref(&p));

    // Two sessions giving one new reference to two payments at once: the second waits for the
    // first's record, and is refused once it commits.
    let first = app.sql().await;
    let second = app.sql().await;
    let first_pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    first
        .batch_execute("BEGIN; UPDATE payments SET psp_reference = 'pi_race' WHERE id = 'pay_other'")
        .await
        .unwrap();
    let racing = actix_rt::spawn({
        let p = p.clone();
        async move {
            second
                .batch_execute(&format!(
                    "UPDATE payments SET psp_reference = 'pi_race' WHERE id = '{p}'"
                ))
                .await
        }
    });
    crate::events::wait_for("the second session to wait for the first", async || {
        let waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&first_pid],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 1
    })
    .await;
    first.batch_execute("COMMIT").await.unwrap();
    let err = racing.await.unwrap().expect_err("the second writer is refused");
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(named("pi_race".into()).await, ["pay_other"]);
}

/// Migration V24 records the references payments held before it, so a database upgraded across
/// it finds them as one that started after it does, and refuses them to any other payment.
#[actix_web::test]
async fn the_references_held_before_v24_are_recorded_by_it() {
    use payrail::adapters::postgres::{Db, MIGRATIONS};
    let app = spawn_app().await;
    let (p, merchant) = captured_payment(&app).await;
    let now = app.sql().await;
    let json = |table: &str, id: &str| {
        let (now, sql) = (
            &now,
            format!("SELECT row_to_json(t)::text FROM {table} t WHERE id = $1"),
        );
        let id = id.to_owned();
        async move { now.query_one(&sql, &[&id]).await.unwrap().get::<_, String>(0) }
    };
    let (merchant_row, payment_row) = (json("merchants", &merchant).await, json("payments", &p).await);

    // A database as V23 left it, holding that payment, and one of its copies with no reference.
    let config = crate::helpers::test_config();
    let before = Db::connect(&config.database).await.unwrap();
    let up_to_23: Vec<_> = MIGRATIONS.iter().copied().filter(|(v, _, _)| *v <= 23).collect();
    assert_eq!(before.apply_migrations(&up_to_23).await.unwrap().len(), 23);
    let (old, conn) = tokio_postgres::connect(&config.database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_rt::spawn(conn);
    old.execute(
        "INSERT INTO merchants SELECT * FROM json_populate_record(NULL::merchants, $1::text::json)",
        &[&merchant_row],
    )
    .await
    .unwrap();
    old.execute(
        "INSERT INTO payments SELECT * FROM json_populate_record(NULL::payments, $1::text::json)",
        &[&payment_row],
    )
    .await
    .unwrap();
    old.batch_execute(&format!(
        "INSERT INTO payments SELECT (jsonb_populate_record(p, jsonb_build_object(
             'id', 'pay_unanswered', 'psp_reference', NULL))).*
         FROM payments p WHERE p.id = '{p}'"
    ))
    .await
    .unwrap();

    assert_eq!(before.migrate().await.unwrap().first(), Some(&24));
    let recorded: Vec<(String, String, String)> = old
        .query("SELECT psp, psp_reference, payment_id FROM payment_psp_references", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let held = now
        .query_one("SELECT psp, psp_reference FROM payments WHERE id = $1", &[&p])
        .await
        .unwrap();
    assert_eq!(recorded, [(held.get(0), held.get(1), p.clone())]);
    let err = old
        .batch_execute(&format!(
            "UPDATE payments SET psp_reference = (SELECT psp_reference FROM payments WHERE id = '{p}')
             WHERE id = 'pay_unanswered'"
        ))
        .await
        .expect_err("the reference is the first payment's");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
    drop(old);
    let (root, name) = config.database.url.rsplit_once('/').unwrap();
    crate::helpers::drop_database(root, name).await;
}

/// Writes a refund journal of `payment` in USD, its correlation its own id, with no entries:
/// what a writer going around payrail could.
async fn forge_journal(c: &impl tokio_postgres::GenericClient, id: &str, payment: &str, merchant: &str) {
    c.execute(
        "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
         VALUES ($1, $2, $3, 'refund', $1, 'USD', now())",
        &[&id, &payment, &merchant],
    )
    .await
    .unwrap();
}

#[actix_web::test]
async fn postgres_itself_refuses_an_unbalanced_journal_and_changes_to_entries() {
    let app = spawn_app().await;
    let (p, merchant) = captured_payment(&app).await;
    let mut db = app.sql().await;

    // Refused when the statement that wrote the entries ends.
    let tx = db.transaction().await.unwrap();
    forge_journal(&tx, "jr_forged", &p, &merchant).await;
    let err = tx
        .execute(
            "INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
             ('jr_forged', 'psp_clearing', 'USD', 100, 0), ('jr_forged', 'platform_fee_revenue', 'USD', 0, 99)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
        "{err}"
    );
    drop(tx);
    // Balanced sums are not enough: one entry alone, or an entry in another currency than its
    // journal's, is refused too; one statement's good journal does not cover another's bad one.
    for (case, entries) in [
        ("one entry", "('jr_forged', 'psp_clearing', 'USD', 100, 0)"),
        (
            "another currency",
            "('jr_forged', 'psp_clearing', 'EUR', 100, 0), ('jr_forged', 'platform_fee_revenue', 'USD', 0, 100)",
        ),
        (
            "a good journal beside it",
            "('jr_good', 'psp_clearing', 'USD', 100, 0), ('jr_good', 'platform_fee_revenue', 'USD', 0, 100),
             ('jr_forged', 'psp_clearing', 'USD', 100, 0), ('jr_forged', 'platform_fee_revenue', 'USD', 0, 99)",
        ),
    ] {
        let tx = db.transaction().await.unwrap();
        forge_journal(&tx, "jr_forged", &p, &merchant).await;
        forge_journal(&tx, "jr_good", &p, &merchant).await;
        let err = tx
            .execute(
                &format!("INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES {entries}"),
                &[],
            )
            .await
            .expect_err(case);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{case}: {err}"
        );
        let said = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert_eq!(said, "journal jr_forged does not balance", "{case}");
        drop(tx);
    }
    // An entry added to a journal that balanced, later, unbalances it: refused too.
    let journal: String = db
        .query_one("SELECT id FROM journals WHERE payment_id = $1 LIMIT 1", &[&p])
        .await
        .unwrap()
        .get(0);
    let err = db
        .execute(
            "INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES ($1, 'psp_clearing', 'USD', 1, 0)",
            &[&journal],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
        "{err}"
    );

    // Entries of a journal that does not exist are refused, balanced or not, even beside a
    // good journal in the same statement.
    for (case, entries) in [
        (
            "balanced",
            "('jr_nowhere', 'psp_clearing', 'USD', 100, 0), ('jr_nowhere', 'platform_fee_revenue', 'USD', 0, 100)",
        ),
        ("one entry", "('jr_nowhere', 'psp_clearing', 'USD', 100, 0)"),
        (
            "beside a good journal",
            &*format!(
                "('{journal}', 'psp_clearing', 'USD', 1, 0), ('{journal}', 'platform_fee_revenue', 'USD', 0, 1),
                 ('jr_nowhere', 'psp_clearing', 'USD', 100, 0), ('jr_nowhere', 'platform_fee_revenue', 'USD', 0, 100)"
            ),
        ),
    ] {
        let err = db
            .execute(
                &format!("INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES {entries}"),
                &[],
            )
            .await
            .expect_err(case);
        let said = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
            "{case}: {err}"
        );
        assert_eq!(said, "an entry names an unknown journal jr_nowhere", "{case}");
    }

    // Nor can entries name a journal another transaction has written and not yet committed.
    let mut other = app.sql().await;
    let pending = other.transaction().await.unwrap();
    forge_journal(&pending, "jr_uncommitted", &p, &merchant).await;
    let err = db
        .execute(
            "INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
             ('jr_uncommitted', 'psp_clearing', 'USD', 100, 0), ('jr_uncommitted', 'platform_fee_revenue', 'USD', 0, 100)",
            &[],
        )
        .await
        .expect_err("a journal not committed yet");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err}"
    );
    drop(pending);

    // A journal with no entries at all is refused at commit, and so is one whose only entries
    // were refused.
    for with_refused_entries in [false, true] {
        let mut tx = db.transaction().await.unwrap();
        forge_journal(&tx, "jr_empty", &p, &merchant).await;
        if with_refused_entries {
            let sp = tx.savepoint("entries").await.unwrap();
            sp.execute(
                "INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES ('jr_empty', 'psp_clearing', 'USD', 1, 0)",
                &[],
            )
            .await
            .expect_err("one entry alone");
            drop(sp);
        }
        let err = tx.commit().await.expect_err("a journal with no entries");
        let said = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert_eq!(said, "journal jr_empty does not balance (no entries)", "{err}");
    }
    let empty: i64 = db
        .query_one("SELECT count(*) FROM journals WHERE id = 'jr_empty'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(empty, 0);

    // The natural key: a second capture journal for the same attempt cannot exist.
    let dup = db
        .execute(
            "INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
             SELECT 'jr_dup', payment_id, merchant_id, kind, correlation_id, currency, now() FROM journals WHERE payment_id = $1",
            &[&p],
        )
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));

    for sql in [
        "UPDATE entries SET debit = debit + 1",
        "DELETE FROM entries",
        "UPDATE journals SET kind = 'refund'",
        "TRUNCATE entries CASCADE",
    ] {
        let e = db.batch_execute(sql).await.unwrap_err();
        let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
        assert!(message.contains("append-only"), "{sql}: {e}");
    }
    // The audit trail names real payments and is never rewritten; a payment with one stays.
    let err = db
        .batch_execute(
            "INSERT INTO payment_transitions (payment_id, seq, from_status, to_status, cause, at)
             VALUES ('pay_nobody', 1, NULL, 'pending', 'forged', now())",
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err}"
    );
    let err = db
        .batch_execute("UPDATE payment_transitions SET cause = 'forged'")
        .await
        .unwrap_err();
    let message = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert!(message.contains("append-only"), "{err}");
    let err = db
        .execute("DELETE FROM payments WHERE id = $1", &[&p])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err}"
    );
    // A balanced journal slipped in past the ledger's balances is caught by verify.
    let tx = db.transaction().await.unwrap();
    forge_journal(&tx, "jr_sideways", &p, &merchant).await;
    tx.execute(
        "INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
         ('jr_sideways', 'psp_clearing', 'USD', 7, 0), ('jr_sideways', 'platform_fee_revenue', 'USD', 0, 7)",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = app.state.db.verify_ledger().await.unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.mismatched_accounts.len(), 2, "{report:?}");
    assert!(report.orphan_entries.is_empty(), "{report:?}");

    // Entries of a journal that does not exist, slipped in around the triggers (as a restore
    // with triggers off could): the database refuses them as written, and verify finds them.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(
        "SET LOCAL session_replication_role = replica;
         INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
         ('jr_orphan', 'psp_clearing', 'USD', 5, 0), ('jr_orphan', 'platform_fee_revenue', 'USD', 0, 5)",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = app.state.db.verify_ledger().await.unwrap();
    assert_eq!(report.orphan_entries, ["jr_orphan"], "{report:?}");
}

/// Migration V29's guards, each against what got past the checks before it: a temporary table
/// shadowing the real one inside a check, an id renamed away from what names it, entries added
/// to a journal committed earlier, an audit trail deleted; and verify reading a journal whose
/// entries are in another currency than its own.
#[actix_web::test]
async fn what_got_past_the_database_checks_no_longer_does() {
    use tokio_postgres::error::SqlState;
    let app = spawn_app().await;
    let (p, merchant) = captured_payment(&app).await;
    let mut db = app.sql().await;

    // Every trigger function of the schema reads the schema's tables, whatever the session's
    // path: a `CREATE OR REPLACE` without its path fails here.
    let unpinned: Vec<String> = db
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
             WHERE p.pronamespace = current_schema()::regnamespace AND l.lanname = 'plpgsql'
               AND p.prokind = 'f' AND p.prorettype = 'trigger'::regtype
               AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\\_path=%')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        unpinned.is_empty(),
        "functions without a fixed search_path: {unpinned:?}"
    );
    // A temporary `journals` and `entries` that balance do not stand in for the real ones.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(
        "CREATE TEMP TABLE journals (id text, currency char(3), tx xid8) ON COMMIT DROP;
         CREATE TEMP TABLE entries (id bigint, journal_id text, currency char(3), debit bigint, credit bigint) ON COMMIT DROP;
         INSERT INTO pg_temp.journals VALUES ('jr_shadow', 'USD', pg_current_xact_id());
         INSERT INTO pg_temp.entries VALUES (1, 'jr_shadow', 'USD', 1, 0), (2, 'jr_shadow', 'USD', 0, 1);",
    )
    .await
    .unwrap();
    // (This session's own unqualified names would find its temporary tables: named in full.)
    tx.execute(
        "INSERT INTO public.journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
         VALUES ('jr_shadow', $1, $2, 'refund', 'jr_shadow', 'USD', now())",
        &[&p, &merchant],
    )
    .await
    .unwrap();
    let err = tx
        .batch_execute(
            "INSERT INTO public.entries (journal_id, account, currency, debit, credit)
             VALUES ('jr_shadow', 'psp_clearing', 'EUR', 0, 1000000)",
        )
        .await
        .expect_err("an unbalanced journal behind a temporary table");
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
    drop(tx);

    // Ids never change: a renamed payment or merchant would leave what names it naming nothing.
    for sql in [
        format!("UPDATE payments SET id = 'pay_renamed' WHERE id = '{p}'"),
        format!("UPDATE merchants SET id = 'mer_renamed' WHERE id = '{merchant}'"),
    ] {
        let err = db.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{sql}: {err}");
    }
    // An ordinary update of either still goes.
    db.batch_execute(&format!("UPDATE payments SET updated_at = updated_at WHERE id = '{p}'"))
        .await
        .unwrap();

    // A journal's entries are its own transaction's: balanced entries added later are refused.
    let journal: String = db
        .query_one("SELECT id FROM journals WHERE payment_id = $1 LIMIT 1", &[&p])
        .await
        .unwrap()
        .get(0);
    let err = db
        .execute(
            "INSERT INTO entries (journal_id, account, currency, debit, credit)
             VALUES ($1, 'psp_clearing', 'USD', 777, 0), ($1, 'platform_fee_revenue', 'USD', 0, 777)",
            &[&journal],
        )
        .await
        .expect_err("entries added to a committed journal");
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
    // In its own transaction, through a savepoint too, a new journal takes its entries.
    let mut tx = db.transaction().await.unwrap();
    forge_journal(&tx, "jr_fresh", &p, &merchant).await;
    let sp = tx.savepoint("entries").await.unwrap();
    sp.execute(
        "INSERT INTO entries (journal_id, account, currency, debit, credit)
         VALUES ('jr_fresh', 'psp_clearing', 'USD', 3, 0), ('jr_fresh', 'platform_fee_revenue', 'USD', 0, 3)",
        &[],
    )
    .await
    .unwrap();
    sp.commit().await.unwrap();
    tx.rollback().await.unwrap();

    // The audit trail stays.
    for sql in [
        "DELETE FROM payment_transitions",
        "DELETE FROM psp_attempts",
        "TRUNCATE payment_transitions",
        "TRUNCATE psp_attempts CASCADE",
    ] {
        let err = db.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {err}");
    }

    // Two journals that each debit one currency and credit another, slipped in around the
    // triggers (a restore): the totals per currency still net to zero, but verify names both.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL session_replication_role = replica;
         INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at) VALUES
         ('jr_mix_a', '{p}', '{merchant}', 'refund', 'jr_mix_a', 'USD', now()),
         ('jr_mix_b', '{p}', '{merchant}', 'refund', 'jr_mix_b', 'EUR', now());
         INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
         ('jr_mix_a', 'psp_clearing', 'USD', 500, 0), ('jr_mix_a', 'psp_clearing', 'EUR', 0, 500),
         ('jr_mix_b', 'psp_clearing', 'EUR', 500, 0), ('jr_mix_b', 'psp_clearing', 'USD', 0, 500);"
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = app.state.db.verify_ledger().await.unwrap();
    assert_eq!(report.unbalanced_journals, ["jr_mix_a", "jr_mix_b"], "{report:?}");
}

/// The references of a payment's rows (its merchant, the payment of an attempt or a journal)
/// are checked once per statement, without the row locks of foreign keys (migration V23), and
/// still hold: a row naming what does not exist is refused, the names cannot change, and what
/// is named can be neither deleted nor truncated.
#[actix_web::test]
async fn postgres_itself_refuses_a_payment_attempt_or_journal_naming_what_does_not_exist() {
    use tokio_postgres::error::SqlState;
    let app = spawn_app().await;
    let (p, merchant) = captured_payment(&app).await;
    let db = app.sql().await;
    let copy = |id: &str, merchant: &str| {
        format!(
            "INSERT INTO payments SELECT (jsonb_populate_record(p, jsonb_build_object(
                 'id', '{id}', 'merchant_id', '{merchant}', 'psp_reference', NULL))).*
             FROM payments p WHERE p.id = '{p}'"
        )
    };
    let attempt = |id: &str, payment: &str| {
        format!(
            "INSERT INTO psp_attempts (id, payment_id, operation, amount, started_at)
             VALUES ('{id}', '{payment}', 'capture', 100, now())"
        )
    };
    // With balanced entries, in a transaction of its own: a journal without entries is refused
    // at commit. One without a payment is a payout's.
    let journal = |id: &str, payment: &str, merchant: &str| {
        let kind = if payment == "NULL" { "payout" } else { "refund" };
        format!(
            "BEGIN;
             INSERT INTO journals (id, payment_id, merchant_id, kind, correlation_id, currency, created_at)
             VALUES ('{id}', {payment}, '{merchant}', '{kind}', '{id}', 'USD', now());
             INSERT INTO entries (journal_id, account, currency, debit, credit) VALUES
             ('{id}', 'psp_clearing', 'USD', 100, 0), ('{id}', 'platform_fee_revenue', 'USD', 0, 100);
             COMMIT;"
        )
    };
    let refused = [
        ("a payment of no merchant", copy("pay_orphan", "mer_nobody")),
        ("an attempt of no payment", attempt("att_orphan", "pay_nowhere")),
        (
            "a journal of no payment",
            journal("jr_orphan", "'pay_nowhere'", &merchant),
        ),
        ("a journal of no merchant", journal("jr_orphan", "NULL", "mer_nobody")),
        (
            "a payment moved to another merchant",
            format!("UPDATE payments SET merchant_id = 'mer_nobody' WHERE id = '{p}'"),
        ),
        (
            "an attempt moved to another payment",
            format!("UPDATE psp_attempts SET payment_id = 'pay_nowhere' WHERE payment_id = '{p}'"),
        ),
    ];
    for (case, sql) in &refused {
        let err = db.batch_execute(sql).await.expect_err(case);
        // A failed statement inside BEGIN leaves the transaction aborted: end it.
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{case}: {err}");
    }
    for table in ["payments", "merchants"] {
        let err = db
            .batch_execute(&format!("TRUNCATE {table} CASCADE"))
            .await
            .expect_err(table);
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{table}: {err}");
    }
    // The same statements naming what exists are accepted: the checks refuse only the missing.
    for (case, sql) in [
        ("a payment of the merchant", copy("pay_copy", &merchant)),
        ("an attempt of the payment", attempt("att_copy", &p)),
        (
            "a journal of the payment",
            journal("jr_payment", &format!("'{p}'"), &merchant),
        ),
        (
            "a journal of the merchant alone",
            journal("jr_payout", "NULL", &merchant),
        ),
    ] {
        db.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    // What they name cannot be deleted. A merchant with nothing but a payment (no API key or
    // connector, whose foreign keys would refuse too), and a payment with nothing but an
    // attempt (no audit trail, which V12 checks), refuse by these checks alone.
    db.batch_execute(
        "INSERT INTO merchants (id, name, default_currency, fee_bps, fee_fixed)
         VALUES ('mer_bare', 'bare', 'USD', 0, 0)",
    )
    .await
    .unwrap();
    db.batch_execute(&copy("pay_bare", "mer_bare")).await.unwrap();
    db.batch_execute(&attempt("att_bare", "pay_bare")).await.unwrap();
    for (case, sql) in [
        (
            "a merchant named by a payment deleted",
            "DELETE FROM merchants WHERE id = 'mer_bare'",
        ),
        (
            "a payment named by an attempt deleted",
            "DELETE FROM payments WHERE id = 'pay_bare'",
        ),
    ] {
        let err = db.batch_execute(sql).await.expect_err(case);
        assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{case}: {err}");
    }
    // An attempt is kept for good (V29), so that payment stays. Named by nothing, a payment and
    // then its merchant go.
    let err = db
        .batch_execute("DELETE FROM psp_attempts WHERE id = 'att_bare'")
        .await
        .expect_err("an attempt deleted");
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    db.batch_execute(
        "INSERT INTO merchants (id, name, default_currency, fee_bps, fee_fixed)
         VALUES ('mer_bare2', 'bare', 'USD', 0, 0)",
    )
    .await
    .unwrap();
    db.batch_execute(&copy("pay_bare2", "mer_bare2")).await.unwrap();
    db.batch_execute(
        "DELETE FROM payments WHERE id = 'pay_bare2';
         DELETE FROM merchants WHERE id = 'mer_bare2';",
    )
    .await
    .unwrap();

    // In one statement, one missing reference among good ones fails the whole statement.
    let err = db
        .batch_execute(&format!(
            "INSERT INTO psp_attempts (id, payment_id, operation, amount, started_at)
             VALUES ('att_good', '{p}', 'capture', 100, now()), ('att_bad', 'pay_nowhere', 'capture', 100, now())"
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{err}");
    let said = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert_eq!(said, "a PSP attempt names an unknown payment pay_nowhere");
}

#[actix_web::test]
async fn a_batch_dropped_mid_flight_leaves_no_transaction_open_and_commits_nothing() {
    // A batch's transaction opens in the same stream as its statements. If the batch's future
    // is dropped while a statement waits (here on a row lock the test holds), its connection
    // must never go back to the pool inside that transaction: it is closed, and PostgreSQL
    // rolls the transaction back once the statement ends.
    use payrail::actors::payment_flow::settle_commit_standalone;
    use std::time::{Duration, Instant};

    let app = crate::helpers::spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let paid = app.pay(2500, "pm_card_visa", "automatic", true).await;
    let id = payrail::domain::PaymentId::parse(paid.body["payment_id"].as_str().unwrap()).unwrap();
    let db = &app.state.db;
    let (before, _) = db.load_payment(&id).await.unwrap().unwrap();
    let holder = app.sql().await;
    holder
        .batch_execute(&format!("BEGIN; SELECT 1 FROM payments WHERE id = '{id}' FOR UPDATE"))
        .await
        .unwrap();
    let commit = settle_commit_standalone(&before, chrono::Utc::now()).unwrap();
    // The batch runs until PostgreSQL shows its update waiting on the row; then it is dropped.
    let watch = app.sql().await;
    let commits = [&commit];
    let batch = db.commit_batch(&commits, 0);
    match futures_util::future::select(Box::pin(batch), Box::pin(a_session_waits_on_a_lock(&watch))).await {
        futures_util::future::Either::Left((r, _)) => panic!("the batch ended while its row was locked: {r:?}"),
        futures_util::future::Either::Right(((), batch)) => drop(batch),
    }
    holder.batch_execute("ROLLBACK").await.unwrap();

    // Every session of this database soon leaves its transaction: none is left open.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = sessions(
            &watch,
            "state IN ('idle in transaction', 'idle in transaction (aborted)')",
        )
        .await;
        let waiting = sessions(&watch, "wait_event_type = 'Lock'").await;
        if open == 0 && waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} sessions left inside a transaction, {waiting} waiting"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing of the dropped batch landed, and the same commit now lands once.
    let (now, _) = db.load_payment(&id).await.unwrap().unwrap();
    assert_eq!(now.version, before.version, "the dropped batch committed");
    db.commit_batch(&[&commit], 0).await.unwrap();
    let (after, _) = db.load_payment(&id).await.unwrap().unwrap();
    assert_eq!(
        (after.version, after.status().as_str()),
        (before.version + 1, "settled")
    );
}

/// Returns once a session of the test's database waits on a lock (10 s at most).
async fn a_session_waits_on_a_lock(watch: &tokio_postgres::Client) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions(watch, "wait_event_type = 'Lock'").await == 0 {
        assert!(Instant::now() < deadline, "no session ever waited on the locked row");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of the test's database that match `condition` (on `pg_stat_activity`).
async fn sessions(client: &tokio_postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[actix_web::test]
async fn a_commit_that_leaves_the_payment_unchanged_writes_none_of_it_and_is_fenced_by_its_version() {
    // A PSP event that moves nothing is recorded with a commit that leaves the payment as it
    // is: the row is not rewritten (its xmin stays), yet the commit lands only while the row
    // still holds the version it was decided on, also against a writer that moves the row
    // while the commit waits for it.
    use payrail::actors::payment_flow::settle_commit_standalone;
    use payrail::adapters::postgres::commit::{Commit, CommitError, ProcessedEvent};
    use std::time::Duration;

    let app = crate::helpers::spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let paid = app.pay(2500, "pm_card_visa", "automatic", true).await;
    let id = payrail::domain::PaymentId::parse(paid.body["payment_id"].as_str().unwrap()).unwrap();
    let db = &app.state.db;
    let sql = app.sql().await;
    let row = async |sql: &tokio_postgres::Client| {
        let r = sql
            .query_one(
                &format!("SELECT xmin::text, version FROM payments WHERE id = '{id}'"),
                &[],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0), r.get::<_, i32>(1))
    };
    let recorded = async |sql: &tokio_postgres::Client, event: &str| {
        let q = format!("SELECT count(*) FROM processed_events WHERE event_id = '{event}'");
        sql.query_one(&q, &[]).await.unwrap().get::<_, i64>(0)
    };
    let noop = |p: &payrail::domain::Payment, event: &str| Commit {
        payment: Some(p.clone()),
        unchanged: true,
        processed_event: Some(ProcessedEvent {
            provider: "sandbox".into(),
            event_id: event.into(),
            event_type: "payment_intent.succeeded".into(),
            raw: b"{}".to_vec(),
        }),
        ..Commit::default()
    };
    let (p, _) = db.load_payment(&id).await.unwrap().unwrap();
    let before = row(&sql).await;
    db.commit_batch(&[&noop(&p, "evt_noop_1")], 0).await.unwrap();
    assert_eq!(row(&sql).await, before, "the payment's row was written");
    assert_eq!(recorded(&sql, "evt_noop_1").await, 1);

    // Decided on a version another writer has moved past: stale, and nothing lands.
    let settle = settle_commit_standalone(&p, chrono::Utc::now()).unwrap();
    db.commit_batch(&[&settle], 0).await.unwrap();
    assert!(matches!(
        db.commit_batch(&[&noop(&p, "evt_noop_2")], 0).await,
        Err(CommitError::Stale)
    ));
    assert_eq!(recorded(&sql, "evt_noop_2").await, 0);

    // A writer holds the row and moves it while the commit waits on it: the commit sees the
    // new version when the lock is released, and is stale.
    let (p, _) = db.load_payment(&id).await.unwrap().unwrap();
    sql.batch_execute(&format!(
        "BEGIN; UPDATE payments SET version = version + 1 WHERE id = '{id}'"
    ))
    .await
    .unwrap();
    let watch = app.sql().await;
    let commit = noop(&p, "evt_noop_3");
    let commits = [&commit];
    let mut batch = Box::pin(db.commit_batch(&commits, 0));
    match futures_util::future::select(batch.as_mut(), Box::pin(a_session_waits_on_a_lock(&watch))).await {
        futures_util::future::Either::Left((r, _)) => panic!("the commit did not wait for the row: {r:?}"),
        futures_util::future::Either::Right(((), _)) => {}
    }
    sql.batch_execute("COMMIT").await.unwrap();
    let r = actix_rt::time::timeout(Duration::from_secs(10), batch).await;
    assert!(matches!(r, Ok(Err(CommitError::Stale))), "{r:?}");
    assert_eq!(recorded(&sql, "evt_noop_3").await, 0);
}
