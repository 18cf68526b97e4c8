//! Reconciliation against PSP settlement reports, end to end: the sandbox books its own
//! captures, refunds and disputes, writes its day's report (with injected faults), and a run
//! matches it against payrail through the real PostgreSQL, ledger shards and actors.

use std::collections::BTreeMap;

use payrail::adapters::psp::sandbox_settlement::charge_fee;
use serde_json::{json, Value};

use crate::events::wait_for;
use crate::helpers::{spawn_app_with, Response, TestApp, DEMO_KEY};

fn quiet(c: &mut payrail::config::Config) {
    // Today's captures are due in today's report: nothing may be late.
    c.reconciliation.window_hours = 0;
    c.reconciliation.daily_at_utc = String::new();
    // Chunks of three lines: every report here runs over several.
    c.reconciliation.chunk_lines = 3;
    c.psp.sandbox.dispute_delay_ms = 20;
}

fn today() -> String {
    chrono::Utc::now().date_naive().to_string()
}

/// The upload query of `connector`'s report of today, in Adyen's format.
fn adyen_day(connector: &str) -> String {
    format!("connector_id={connector}&format=adyen&date={}", today())
}

async fn operator(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> Response {
    let token = app.state.config.admin.token.clone();
    let body = body.map(|b| b.to_string());
    app.request(method, path, Some(&token), None, body.as_deref()).await
}

async fn demo_connector(app: &TestApp) -> String {
    let r = app.get("/api/v1/connectors").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["data"][0]["psp"], "sandbox");
    r.body["data"][0]["id"].as_str().unwrap().to_owned()
}

/// A CSV report uploaded as the operator (`text/csv`).
async fn upload(app: &TestApp, query: &str, csv: String) -> Response {
    let mut resp = app
        .client
        .post(format!("{}/admin/v1/reconciliation/runs?{query}", app.address))
        .insert_header(("Authorization", format!("Bearer {}", app.state.config.admin.token)))
        .insert_header(("Content-Type", "text/csv"))
        .send_body(csv)
        .await
        .unwrap();
    let raw = resp.body().limit(1 << 20).await.unwrap().to_vec();
    Response {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    }
}

/// A Stripe-format report of one charge of 42.00 USD (fee 1.30) on `reference`, made now.
fn one_charge_report(reference: &str) -> String {
    let header = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n";
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    format!("{header}txn_a,charge,{reference},42.00,1.30,40.70,usd,{now},,charge\n")
}

async fn exceptions(app: &TestApp, query: &str) -> Vec<Value> {
    let r = operator(
        app,
        "GET",
        &format!("/admin/v1/reconciliation/exceptions?limit=100&{query}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["data"].as_array().unwrap().clone()
}

fn by_type(list: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in list {
        out.entry(e["type"].as_str().unwrap().to_owned())
            .or_default()
            .push(e.clone());
    }
    out
}

async fn status(app: &TestApp, id: &str) -> String {
    app.get(&format!("/api/v1/payments/{id}")).await.body["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What an account holds: its debits less its credits.
async fn balance(app: &TestApp, account: &str) -> i64 {
    let sql = "SELECT coalesce(sum(debit_total - credit_total), 0)::int8 FROM ledger_accounts WHERE account = $1";
    app.sql().await.query_one(sql, &[&account]).await.unwrap().get(0)
}

async fn scalar(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[actix_web::test]
async fn a_report_with_every_fault_raises_each_exception_once_and_settles_the_rest() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    // Twelve charges, in booking order.
    let mut charged = Vec::new();
    for i in 0..12 {
        let r = app.pay(1000 + i, "pm_card_visa", "automatic", true).await;
        assert_eq!(r.body["status"], "captured", "{}", r.body);
        charged.push((r.body["payment_id"].as_str().unwrap().to_owned(), 1000 + i));
    }
    // A partial capture, two partial refunds, and a dispute.
    let manual = app.pay(2000, "pm_card_visa", "manual", true).await;
    let manual_id = manual.body["payment_id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/payments/{manual_id}/capture"),
            json!({ "amount": { "value": 1500, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.body["status"], "captured", "{}", r.body);
    charged.push((manual_id.clone(), 1500));
    let refunded = charged[7].0.clone();
    for amount in [100, 200] {
        let r = app
            .post(
                &format!("/api/v1/payments/{refunded}/refunds"),
                json!({ "amount": { "value": amount, "currency": "USD" } }),
            )
            .await;
        assert_eq!(r.body["status"], "succeeded", "{}", r.body);
    }
    let disputed = app.pay(3000, "pm_card_createDispute", "automatic", true).await;
    let disputed_id = disputed.body["payment_id"].as_str().unwrap().to_owned();
    charged.push((disputed_id.clone(), 3000));
    wait_for("the dispute", async || {
        status(&app, &disputed_id).await == "chargeback_open"
    })
    .await;

    // missing:2 takes charges 0–1, amount_mismatch:3 charges 2–4, duplicate:1 charge 5.
    let r = operator(
        &app,
        "POST",
        "/admin/v1/reconciliation/runs",
        Some(json!({ "connector_id": connector, "date": today(),
                     "faults": "amount_mismatch:3,missing:2,duplicate:1,unknown:2" })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let run = r.body.clone();
    assert_eq!(run["status"], "succeeded", "{run}");
    // 14 charges − 2 missing + 1 duplicate + 2 unknown, 2 refunds, 1 dispute; no payout: the
    // day is under way.
    assert_eq!(run["lines"], 18, "{run}");
    // Charges 6–13 and the first copy of 5 (9), two refunds and the dispute.
    assert_eq!(run["matched"], 12, "{run}");
    assert_eq!(run["exceptions"], 8, "{run}");
    assert_eq!(run["already_applied"], 0, "{run}");

    let all = exceptions(&app, &format!("run_id={}", run["id"].as_str().unwrap())).await;
    let found = by_type(&all);
    let ids = |t: &str| -> Vec<String> {
        let mut v: Vec<String> = found
            .get(t)
            .map(|l| {
                l.iter()
                    .map(|e| e["payment_id"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let expect = |range: std::ops::Range<usize>| -> Vec<String> {
        let mut v: Vec<String> = charged[range].iter().map(|(id, _)| id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids("missing_in_report"), expect(0..2), "{all:#?}");
    assert_eq!(ids("amount_mismatch"), expect(2..5), "{all:#?}");
    assert_eq!(ids("duplicate_in_report"), expect(5..6), "{all:#?}");
    assert_eq!(found.get("missing_in_payrail").map(Vec::len), Some(2), "{all:#?}");
    assert_eq!(found.len(), 4, "no other type: {all:#?}");
    for e in &found["amount_mismatch"] {
        assert_eq!(
            e["reported_amount"].as_i64().unwrap(),
            e["expected_amount"].as_i64().unwrap() + 1
        );
    }
    // The first three charge lines of the file (the two missing ones were left out before them).
    let mut lines: Vec<i64> = found["amount_mismatch"]
        .iter()
        .map(|e| e["line"].as_i64().unwrap())
        .collect();
    lines.sort();
    assert_eq!(lines, vec![2, 3, 4]);

    // Matched captures are settled through the state machine; the others are not.
    for (id, _) in &charged[5..12] {
        let s = status(&app, id).await;
        assert_eq!(s, "settled", "{id}");
    }
    assert_eq!(status(&app, &manual_id).await, "settled");
    for (id, _) in &charged[0..5] {
        assert_eq!(status(&app, id).await, "captured", "{id}");
    }
    // Settled while the dispute is open: the flag, not the status.
    assert_eq!(status(&app, &disputed_id).await, "chargeback_open");
    let settled: bool = app
        .sql()
        .await
        .query_one("SELECT settled FROM payments WHERE id = $1", &[&disputed_id])
        .await
        .unwrap()
        .get(0);
    assert!(settled);

    // Fees: every line's in the report once — the matched charges', the mismatched ones', the
    // unknown ones' (the PSP kept them all) and the dispute's; not the repeated line's. Nothing
    // reached the bank: the PSP pays a day out once it has ended.
    let fees = &app.state.config.psp.sandbox.settlement;
    let expected_fees: i64 = charged[2..14].iter().map(|(_, a)| charge_fee(*a, fees)).sum::<i64>()
        + 2 * charge_fee(1000, fees)
        + fees.dispute_fee;
    assert_eq!(balance(&app, "psp_fees_expense").await, expected_fees);
    assert_eq!(balance(&app, "bank").await, 0);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
    let metrics = app.request("GET", "/metrics", None, None, None).await;
    let text = String::from_utf8_lossy(&metrics.raw).to_string();
    let ratio_line = text
        .lines()
        .find(|l| l.starts_with("payrail_reconciliation_match_ratio{psp=\"sandbox\"}"))
        .unwrap_or_else(|| panic!("no ratio in {text}"));
    let ratio: f64 = ratio_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((ratio - 12.0 / 20.0).abs() < 1e-9, "{ratio_line}");
    assert!(text.contains("payrail_reconciliation_exceptions_open{type=\"amount_mismatch\"} 3"));

    // The same report again changes nothing.
    let journals = app.count("journals").await;
    let r = operator(
        &app,
        "POST",
        "/admin/v1/reconciliation/runs",
        Some(json!({ "connector_id": connector, "date": today(),
                     "faults": "amount_mismatch:3,missing:2,duplicate:1,unknown:2" })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["matched"], 0, "{}", r.body);
    assert_eq!(r.body["exceptions"], 0, "{}", r.body);
    assert_eq!(r.body["already_applied"], 18, "{}", r.body);
    assert_eq!(app.count("journals").await, journals);
    assert_eq!(exceptions(&app, "").await.len(), 8);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());

    // A report without the faults resolves what was missing, and matches what mismatched
    // before? No: mismatched lines were applied (as exceptions) and stay for an operator.
    let r = operator(
        &app,
        "POST",
        "/admin/v1/reconciliation/runs",
        Some(json!({ "connector_id": connector, "date": today() })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The two missing charges are new lines now: matched, settled, and their exceptions closed.
    assert_eq!(r.body["matched"], 2, "{}", r.body);
    for (id, _) in &charged[0..2] {
        assert_eq!(status(&app, id).await, "settled", "{id}");
    }
    let open = by_type(&exceptions(&app, "status=open").await);
    assert!(!open.contains_key("missing_in_report"), "{open:#?}");

    // An operator resolves an exception; the first resolution is the record.
    let id = found["amount_mismatch"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/admin/v1/reconciliation/exceptions/{id}/resolve");
    let r = operator(
        &app,
        "POST",
        &path,
        Some(json!({ "note": "PSP fixed the amount in its next report", "resolved_by": "ops@shop" })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "resolved");
    assert_eq!(r.body["resolved_by"], "ops@shop");
    let again = operator(
        &app,
        "POST",
        &path,
        Some(json!({ "note": "other", "resolved_by": "someone" })),
    )
    .await;
    assert_eq!(again.body["resolution_note"], "PSP fixed the amount in its next report");
    let missing = operator(
        &app,
        "POST",
        "/admin/v1/reconciliation/exceptions/rex_nope/resolve",
        Some(json!({ "note": "x", "resolved_by": "y" })),
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(exceptions(&app, "type=amount_mismatch&status=open").await.len(), 2);
}

#[actix_web::test]
async fn an_adyen_report_matches_every_line_and_feeds_the_same_ledger() {
    // Actors leave memory at once: the run settles the payments without them (the batch path).
    let app = spawn_app_with(|c| {
        quiet(c);
        c.actors.idle_timeout_ms = 50;
    })
    .await;
    let connector = demo_connector(&app).await;
    let mut ids = Vec::new();
    for amount in [1999, 2500, 10_000] {
        let r = app.pay(amount, "pm_card_mastercard", "automatic", true).await;
        ids.push(r.body["payment_id"].as_str().unwrap().to_owned());
    }
    let r = app
        .post(
            &format!("/api/v1/payments/{}/refunds", ids[2]),
            json!({ "amount": { "value": 4000, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The sandbox's own report, in Adyen's format.
    let report = app
        .get(&format!("/sandbox/v1/settlement_reports/{}?format=adyen", today()))
        .await;
    assert_eq!(report.status, 200);
    let csv = String::from_utf8(report.raw).unwrap();
    assert!(
        csv.starts_with("Company Account,Merchant Account,Psp Reference,"),
        "{csv}"
    );
    wait_for("the actors to passivate", async || app.state.registry.live() == 0).await;
    // Three charges and the refund; no payout while the day is under way.
    assert_eq!(csv.lines().count(), 1 + 3 + 1, "{csv}");
    let r = upload(&app, &adyen_day(&connector), csv).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["matched"], 4, "{}", r.body);
    assert_eq!(r.body["exceptions"], 0, "{}", r.body);
    assert_eq!(r.body["match_ratio"], 1.0);
    for id in &ids {
        assert_eq!(status(&app, id).await, "settled", "{id}");
    }
    // Net of the day = Σ charges − fees − refund: it waits at the PSP (psp_clearing) until the
    // day's payout.
    let fees = &app.state.config.psp.sandbox.settlement;
    let total_fees: i64 = [1999, 2500, 10_000].iter().map(|a| charge_fee(*a, fees)).sum();
    let net = 1999 + 2500 + 10_000 - 4000 - total_fees;
    assert_eq!(balance(&app, "psp_clearing").await, net);
    assert_eq!(balance(&app, "bank").await, 0);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
    // Once the day has ended (the book moved back two days: a day that ended minutes ago may
    // still be landing), its report pays that net out.
    app.sql()
        .await
        .execute("UPDATE sandbox_settlement_book SET at = at - interval '2 days'", &[])
        .await
        .unwrap();
    let day = (chrono::Utc::now() - chrono::Duration::days(2)).date_naive();
    let report = app
        .get(&format!("/sandbox/v1/settlement_reports/{day}?format=adyen"))
        .await;
    let csv = String::from_utf8(report.raw).unwrap();
    let payouts: Vec<&str> = csv.lines().filter(|l| l.contains(",MerchantPayout,")).collect();
    assert_eq!(payouts.len(), 1, "{csv}");
    let net_debit = payouts[0].split(',').nth(14).unwrap();
    assert_eq!(
        payrail::domain::settlement::parse_amount(net_debit, 2),
        Some(net),
        "{}",
        payouts[0]
    );
}

#[actix_web::test]
async fn a_stripe_itemized_report_names_charges_by_charge_and_matches_by_payment_intent() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let mut intents = Vec::new();
    for amount in [1999, 2500, 3100] {
        let r = app.pay(amount, "pm_card_visa", "automatic", true).await;
        assert_eq!(r.body["status"], "captured", "{}", r.body);
        let id = r.body["payment_id"].as_str().unwrap().to_owned();
        let pi = r.body["psp_reference"].as_str().unwrap().to_owned();
        intents.push((id, pi));
    }
    let r = app
        .post(
            &format!("/api/v1/payments/{}/refunds", intents[1].0),
            json!({ "amount": { "value": 500, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.body["status"], "succeeded", "{}", r.body);
    // The sandbox's report rewritten as Stripe's Reports API gives it: no `type`, each charge
    // named by a `ch_…`, `created` in the report's own zone beside `created_utc`; at first
    // without the `payment_intent_id` column.
    let report = app.get(&format!("/sandbox/v1/settlement_reports/{}", today())).await;
    assert_eq!(report.status, 200);
    let csv = String::from_utf8(report.raw).unwrap();
    let itemized = |with_intents: bool| {
        let mut out = String::from(
            "balance_transaction_id,created_utc,created,currency,gross,fee,net,reporting_category,source_id",
        );
        out.push_str(if with_intents { ",payment_intent_id\n" } else { "\n" });
        let mut fees = 0;
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let [id, _, source, amount, fee, net, currency, created, _, category] = f[..] else {
                panic!("{line}")
            };
            let local = "2000-01-01 00:00:00";
            let (source, intent, amount, net) = match category {
                // The last charge as the report has it differs from payrail's capture.
                "charge" if source == intents[2].1 => {
                    ("ch_last".to_owned(), source, "32.00".to_owned(), "31.00".to_owned())
                }
                "charge" => (format!("ch_{id}"), source, amount.to_owned(), net.to_owned()),
                "refund" | "payout" => (source.to_owned(), "", amount.to_owned(), net.to_owned()),
                other => panic!("{other}"),
            };
            let fee = if source == "ch_last" { "1.00" } else { fee };
            fees += payrail::domain::settlement::parse_amount(fee, 2).unwrap();
            out.push_str(&format!(
                "{id},{created},{local},{currency},{amount},{fee},{net},{category},{source}"
            ));
            out.push_str(&if with_intents {
                format!(",{intent}\n")
            } else {
                "\n".to_owned()
            });
        }
        // A charge payrail did not make: with the column, it has no PaymentIntent.
        let extra = "txn_extra,2026-11-27 10:00:00,,usd,9.00,0.50,8.50,charge,ch_extra";
        out.push_str(&format!("{extra}{}\n", if with_intents { "," } else { "" }));
        fees += 50;
        (out, fees)
    };
    let query = format!("connector_id={connector}&date={}", today());
    let (first, _) = itemized(false);
    let r = upload(&app, &query, first).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The refund matches; no charge can.
    assert_eq!(r.body["matched"], 1, "{}", r.body);
    // Each charge is missing, says why, and is not applied (its fee neither).
    let list = by_type(&exceptions(&app, "status=open").await);
    let missing = &list["missing_in_payrail"];
    assert_eq!(missing.len(), 4, "{list:?}");
    for m in missing {
        let detail = m["detail"].as_str().unwrap();
        assert!(detail.contains("payment_intent_id"), "{m}");
    }
    assert_eq!(list["missing_in_report"].len(), 3, "{list:?}");
    assert_eq!(balance(&app, "psp_fees_expense").await, 0);

    // Given again with the column, as the detail says: the charges find their payments (the
    // last one's amount differs), every wait for the column ends, the captures the lines name
    // are no longer missing from the report, and every fee of the file is posted once.
    let (second, fees) = itemized(true);
    let r = upload(&app, &query, second).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (r.body["matched"].as_i64(), r.body["already_applied"].as_i64()),
        (Some(2), Some(1)),
        "{}",
        r.body
    );
    for (id, _) in &intents[..2] {
        assert_eq!(status(&app, id).await, "settled", "{id}");
    }
    let list = by_type(&exceptions(&app, "status=open").await);
    assert_eq!(
        list.iter().map(|(t, l)| (t.as_str(), l.len())).collect::<Vec<_>>(),
        [("amount_mismatch", 1), ("missing_in_payrail", 1)],
        "{list:?}"
    );
    assert_eq!(list["amount_mismatch"][0]["payment_id"], intents[2].0.as_str());
    // The charge payrail did not make is missing still, now applied (it names its charge in a
    // file with the column), with no advice.
    let missing = &list["missing_in_payrail"][0];
    assert_eq!(missing["reference"], "ch_extra");
    assert_eq!(missing["detail"], "line 6: no payment has this reference");
    // What resolved the others says how.
    let resolved = by_type(&exceptions(&app, "status=resolved").await);
    let notes = |t: &str| -> Vec<String> {
        let mut n: Vec<String> = resolved[t]
            .iter()
            .map(|e| {
                e["resolution_note"]
                    .as_str()
                    .unwrap()
                    .split(" rcn_")
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        n.sort();
        n.dedup();
        n
    };
    assert_eq!(notes("missing_in_payrail"), ["read with payment_intent_id by run"]);
    assert_eq!(notes("missing_in_report"), ["matched by run", "named by run"]);
    assert_eq!(balance(&app, "psp_fees_expense").await, fees);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn a_run_whose_end_went_unrecorded_is_failed_by_the_connectors_next_run() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    // What a run leaves when the database stopped answering as it finished: `running`, by this
    // process (outside cluster mode, no holder).
    app.sql()
        .await
        .execute(
            "INSERT INTO reconciliation_runs (id, connector_id, format, source, report_date, status)
             VALUES ('rcn_unfinished', $1, 'stripe', 'upload', current_date, 'running')",
            &[&connector],
        )
        .await
        .unwrap();
    let r = app.pay(1000, "pm_card_visa", "automatic", true).await;
    let reference = r.body["psp_reference"].as_str().unwrap().to_owned();
    let r = upload(
        &app,
        &format!("connector_id={connector}"),
        one_charge_report(&reference),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = operator(&app, "GET", "/admin/v1/reconciliation/runs/rcn_unfinished", None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("could not be recorded"),
        "{}",
        r.body
    );
}

#[actix_web::test]
async fn an_adyen_report_reads_its_payout_and_fee_lines_that_name_no_transaction() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let r = app.pay(10_000, "pm_card_visa", "automatic", true).await;
    let id = r.body["payment_id"].as_str().unwrap().to_owned();
    let report = app
        .get(&format!("/sandbox/v1/settlement_reports/{}?format=adyen", today()))
        .await;
    let mut csv = String::from_utf8(report.raw).unwrap();
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    // The batch's payout and an invoice's fee, as Adyen writes them: no PSP reference, a net
    // only.
    csv.push_str(&format!(
        "C,M,,Payout of batch 1,,{now},UTC,MerchantPayout,,,,,,USD,90.00,,,,,,,,1\n\
         C,M,,Invoice 2026-11,,{now},UTC,Fee,,,,,,USD,12.50,,,,,,,,1\n"
    ));
    let fees_before = balance(&app, "psp_fees_expense").await;
    let r = upload(&app, &adyen_day(&connector), csv).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The charge and the payout match; the fee line is one payrail does not reconcile, not a
    // line it could not read, and what the PSP kept is posted all the same.
    assert_eq!(r.body["matched"], 2, "{}", r.body);
    let list = by_type(&exceptions(&app, "status=open").await);
    assert_eq!(list.keys().collect::<Vec<_>>(), vec!["unsupported_line"], "{list:?}");
    let detail = list["unsupported_line"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("the fee the PSP kept on it was posted"), "{detail}");
    assert_eq!(status(&app, &id).await, "settled");
    let fees_after = balance(&app, "psp_fees_expense").await;
    let charge_fee = charge_fee(10_000, &app.state.config.psp.sandbox.settlement);
    assert_eq!(fees_after - fees_before, charge_fee + 1250);
    let bank = balance(&app, "bank").await;
    // The payout moved 90.00 (the sandbox pays its own day out once it has ended).
    assert_eq!(bank, 9000);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn a_malformed_report_is_refused_whole_and_bad_lines_are_exceptions_with_their_line() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let r = app.pay(4200, "pm_card_visa", "automatic", true).await;
    let id = r.body["payment_id"].as_str().unwrap().to_owned();
    let reference: String = app
        .sql()
        .await
        .query_one("SELECT psp_reference FROM payments WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let header = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n";
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    let good = format!("txn_a,charge,{reference},42.00,1.30,40.70,usd,{now},,charge\n");

    // A ragged line: the whole file is refused, and nothing of it applied.
    let ragged = format!("{header}{good}txn_b,charge\n");
    let r = upload(&app, &format!("connector_id={connector}"), ragged).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "report_malformed");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 3"), "{message}");
    assert_eq!(app.count("settlement_lines").await, 0);
    assert_eq!(status(&app, &id).await, "captured");
    let runs = operator(&app, "GET", "/admin/v1/reconciliation/runs", None).await;
    assert_eq!(runs.body["data"][0]["status"], "failed");
    // Not a report at all.
    let r = upload(&app, &format!("connector_id={connector}"), "hello,world\n1,2\n".into()).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no \"id\" column"),
        "{}",
        r.body
    );

    // Lines whose fields do not read become exceptions with their line; the rest applies.
    let mixed = format!(
        "{header}txn_x,charge,pi_x,12.3.4,0,0,usd,{now},,charge\n{good}txn_y,charge,pi_y,1.00,0.10,0.80,usd,{now},,charge\ntxn_z,stripe_fee,fee_1,-1.00,0,-1.00,usd,{now},,fee\n"
    );
    let r = upload(&app, &format!("connector_id={connector}"), mixed).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["matched"], 1, "{}", r.body);
    let list = exceptions(&app, "").await;
    let mut lines: Vec<(String, i64)> = list
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["line"].as_i64().unwrap()))
        .collect();
    lines.sort_by_key(|(_, l)| *l);
    assert_eq!(
        lines,
        vec![
            ("malformed_line".to_owned(), 2),
            ("malformed_line".to_owned(), 4),
            ("unsupported_line".to_owned(), 5)
        ]
    );
    assert_eq!(status(&app, &id).await, "settled");
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());

    // A charge payrail has not captured yet is a status_mismatch and stays unapplied; once the
    // capture lands, the same report matches it and the exception resolves itself.
    let held = app.pay(3000, "pm_card_visa", "manual", true).await;
    let held_id = held.body["payment_id"].as_str().unwrap().to_owned();
    let held_ref = held.body["psp_reference"].as_str().unwrap().to_owned();
    let early = format!("{header}txn_held,charge,{held_ref},30.00,1.00,29.00,usd,{now},,charge\n");
    let r = upload(&app, &format!("connector_id={connector}"), early.clone()).await;
    assert_eq!(
        (r.body["matched"].as_i64(), r.body["exceptions"].as_i64()),
        (Some(0), Some(1)),
        "{}",
        r.body
    );
    assert_eq!(exceptions(&app, "type=status_mismatch&status=open").await.len(), 1);
    let r = app
        .post(&format!("/api/v1/payments/{held_id}/capture"), json!({}))
        .await;
    assert_eq!(r.body["status"], "captured", "{}", r.body);
    let r = upload(&app, &format!("connector_id={connector}"), early).await;
    assert_eq!(r.body["matched"], 1, "{}", r.body);
    assert_eq!(status(&app, &held_id).await, "settled");
    assert_eq!(exceptions(&app, "type=status_mismatch&status=open").await.len(), 0);

    // Validation.
    let r = upload(&app, "connector_id=mca_unknown", "x".into()).await;
    assert_eq!(r.status, 404);
    let other = app.new_merchant().await;
    let theirs = app.request("GET", "/api/v1/connectors", Some(&other), None, None).await;
    assert_eq!(theirs.status, 200, "{}", theirs.body);
    let their_id = theirs.body["data"][0]["id"].as_str().unwrap();
    assert!(their_id.starts_with("mca_") && their_id != connector, "{their_id}");
    let r = app
        .request(
            "GET",
            "/sandbox/v1/settlement_reports/2026-13-01",
            Some(DEMO_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 400);
    let r = app
        .request(
            "GET",
            &format!("/sandbox/v1/settlement_reports/{}?faults=lost:1", today()),
            Some(DEMO_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 400);
}

/// A dispute's line matches while its reversal's, beside it, does not (payrail has the dispute
/// still open): the reversal's `status_mismatch` stays open; it is resolved only by its own line
/// matching later, once payrail has the dispute won.
#[actix_web::test]
async fn a_line_that_matched_does_not_resolve_another_lines_mismatch() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let disputed = app.pay(3000, "pm_card_createDispute", "automatic", true).await;
    let id = disputed.body["payment_id"].as_str().unwrap().to_owned();
    wait_for("the dispute", async || status(&app, &id).await == "chargeback_open").await;
    let du: String = app
        .sql()
        .await
        .query_one("SELECT psp_reference FROM disputes WHERE payment_id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let header = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n";
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    let report = format!(
        "{header}txn_du1,adjustment,{du},-30.00,0,-30.00,usd,{now},,dispute\n\
         txn_du2,adjustment,{du},30.00,0,30.00,usd,{now},,dispute_reversal\n"
    );
    let r = upload(&app, &format!("connector_id={connector}"), report).await;
    // The dispute's line matched; the reversal's did not, and the capture is missing from it.
    assert_eq!(
        (r.body["matched"].as_i64(), r.body["exceptions"].as_i64()),
        (Some(1), Some(2)),
        "{}",
        r.body
    );
    let open = exceptions(&app, "type=status_mismatch&status=open").await;
    assert_eq!(open.len(), 1, "the reversal's mismatch stays open: {open:?}");
}

#[actix_web::test]
async fn a_connector_is_missing_only_its_own_captures() {
    let app = spawn_app_with(quiet).await;
    let a = demo_connector(&app).await;
    let merchant = app.first_merchant().await;
    let mine = app.pay(4200, "pm_card_visa", "automatic", true).await;
    let reference = mine.body["psp_reference"].as_str().unwrap().to_owned();
    // A second connector of the same PSP takes the merchant's next payment.
    let path = format!("/admin/v1/merchants/{merchant}/connectors");
    let b = json!({ "connector_id": "mca_other", "psp": "sandbox", "label": "B" });
    let r = operator(&app, "POST", &path, Some(b)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let path = format!("/admin/v1/merchants/{merchant}/routing");
    let r = operator(&app, "PUT", &path, Some(json!({ "default": ["mca_other"] }))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let theirs = app.pay(777, "pm_card_visa", "automatic", true).await;
    assert_eq!(theirs.body["routing"]["connector_id"], "mca_other", "{}", theirs.body);
    // A's report names A's capture, and only it: nothing of A's is missing, and B's capture is
    // B's to find in B's reports.
    let csv = one_charge_report(&reference);
    let r = upload(&app, &format!("connector_id={a}"), csv.clone()).await;
    assert_eq!((r.status, &r.body["matched"]), (201, &json!(1)), "{}", r.body);
    let all = exceptions(&app, "").await;
    assert!(!by_type(&all).contains_key("missing_in_report"), "{all:#?}");
    // A's report given under B matches nothing of A's a second time: its charge is not B's.
    let r = upload(&app, "connector_id=mca_other", csv).await;
    assert_eq!((r.status, &r.body["matched"]), (201, &json!(0)), "{}", r.body);
    let all = exceptions(&app, "").await;
    assert_eq!(by_type(&all)["missing_in_payrail"].len(), 1, "{all:#?}");
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM settlement_lines WHERE outcome = 'matched'").await,
        1
    );
    // The sandbox keeps one book a merchant, which the merchant's own connector reconciles: B's
    // capture is in it and matches there; B's connector given that line after is a duplicate,
    // never a second match.
    let theirs_ref = theirs.body["psp_reference"].as_str().unwrap().to_owned();
    let header = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n";
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    let b_line = format!("{header}txn_b,charge,{theirs_ref},7.77,0.30,7.47,usd,{now},,charge\n");
    let r = upload(&app, &format!("connector_id={a}"), b_line.clone()).await;
    assert_eq!((r.status, &r.body["matched"]), (201, &json!(1)), "{}", r.body);
    let r = upload(&app, "connector_id=mca_other", b_line).await;
    assert_eq!((r.status, &r.body["matched"]), (201, &json!(0)), "{}", r.body);
    let all = exceptions(&app, "").await;
    assert_eq!(by_type(&all)["duplicate_in_report"].len(), 1, "{all:#?}");
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM settlement_lines WHERE outcome = 'matched'").await,
        2
    );
}

#[actix_web::test]
async fn a_report_run_again_has_the_same_day_and_raises_what_is_missing_since() {
    let app = spawn_app_with(quiet).await;
    let a = demo_connector(&app).await;
    let paid = app.pay(4200, "pm_card_visa", "automatic", true).await;
    let reference = paid.body["psp_reference"].as_str().unwrap().to_owned();
    let csv = one_charge_report(&reference);
    let first = upload(&app, &format!("connector_id={a}"), csv.clone()).await;
    assert_eq!(
        (first.status, &first.body["matched"]),
        (201, &json!(1)),
        "{}",
        first.body
    );
    let missing = async || {
        by_type(&exceptions(&app, "").await)
            .get("missing_in_report")
            .map_or(0, Vec::len)
    };
    assert_eq!(missing().await, 0);
    // A capture the report does not name, then the same report again: every line of it was
    // applied before, and its day is still its lines' day.
    let later = app.pay(777, "pm_card_visa", "automatic", true).await;
    assert_eq!(later.body["status"], "captured", "{}", later.body);
    let again = upload(&app, &format!("connector_id={a}"), csv).await;
    assert_eq!(
        (again.status, &again.body["already_applied"]),
        (201, &json!(1)),
        "{}",
        again.body
    );
    assert_eq!(missing().await, 1, "the capture missing from the report");
}

#[actix_web::test]
async fn the_reconcile_command_streams_a_file_to_the_server() {
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let r = app.pay(777, "pm_card_visa", "automatic", true).await;
    let id = r.body["payment_id"].as_str().unwrap().to_owned();
    let report = app.get(&format!("/sandbox/v1/settlement_reports/{}", today())).await;
    let dir = std::env::temp_dir().join(format!("payrail-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("report.csv");
    std::fs::write(&file, &report.raw).unwrap();
    let (address, file2) = (app.address.clone(), file.clone());
    let out = actix_web::rt::task::spawn_blocking(move || {
        // Bounded: `timeout` ends the command if the server never answers.
        std::process::Command::new("timeout")
            .args(["--kill-after=5", "300", env!("CARGO_BIN_EXE_payrail")])
            .args(["reconcile", "--connector", &connector, "--file"])
            .arg(&file2)
            .args(["--url", &address])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["matched"], 1, "{run}");
    assert_eq!(run["source"], "upload");
    assert_eq!(status(&app, &id).await, "settled");
}

#[actix_web::test]
async fn a_line_repeated_in_a_later_chunk_is_matched_once() {
    // Chunks of three lines: the repeats below sit in the chunk after their first copies.
    let app = spawn_app_with(quiet).await;
    let connector = demo_connector(&app).await;
    let mut refs = Vec::new();
    for amount in [1000, 2000, 3000] {
        let r = app.pay(amount, "pm_card_visa", "automatic", true).await;
        refs.push((
            r.body["payment_id"].as_str().unwrap().to_owned(),
            r.body["psp_reference"].as_str().unwrap().to_owned(),
            amount,
        ));
    }
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S");
    let line = |key: &str, reference: &str, amount: i64| {
        let major = payrail::domain::settlement::format_amount(amount, 2);
        format!("{key},charge,{reference},{major},0.00,{major},usd,{now},,charge\n")
    };
    let mut csv = "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n".to_owned();
    csv += &line("txn_1", &refs[0].1, refs[0].2);
    csv += &line("txn_2", &refs[1].1, refs[1].2);
    csv += &line("txn_3", &refs[2].1, refs[2].2);
    // The same key again, and the same capture under another key.
    csv += &line("txn_1", &refs[0].1, refs[0].2);
    csv += &line("txn_2b", &refs[1].1, refs[1].2);
    let r = upload(&app, &format!("connector_id={connector}"), csv).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (r.body["matched"].as_i64(), r.body["exceptions"].as_i64()),
        (Some(3), Some(2)),
        "{}",
        r.body
    );
    let dups = exceptions(&app, "type=duplicate_in_report").await;
    let mut keys: Vec<&str> = dups.iter().map(|e| e["line_key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, vec!["txn_1", "txn_2b"], "{dups:#?}");
    let other_key = dups.iter().find(|e| e["line_key"] == "txn_2b").unwrap();
    assert_eq!(other_key["payment_id"], refs[1].0.as_str());
    let matched = scalar(&app, "SELECT count(*) FROM settlement_lines WHERE outcome = 'matched'").await;
    assert_eq!(matched, 3);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn the_database_refuses_a_chunk_whose_lines_or_captures_were_applied_since_it_was_classified() {
    // Runs of one connector on two nodes classify the same report at once; only one may apply a
    // line, and only one line may match a capture. The database decides, at the lines' INSERT.
    use payrail::adapters::postgres::reconciliation::{AppliedLine, ChunkWrite, ReportLine};
    use payrail::domain::settlement::LineKind;
    use tokio_postgres::error::SqlState;

    let app = spawn_app_with(quiet).await;
    let connector_id = demo_connector(&app).await;
    let paid = app.pay(1500, "pm_card_visa", "automatic", true).await;
    let (payment, reference) = (
        paid.body["payment_id"].as_str().unwrap().to_owned(),
        paid.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let now = chrono::Utc::now();
    let major = payrail::domain::settlement::format_amount(1500, 2);
    let csv = format!(
        "id,type,source,amount,fee,net,currency,created,available_on,reporting_category\n\
         txn_a,charge,{reference},{major},0.00,{major},usd,{},,charge\n",
        now.format("%Y-%m-%d %H:%M:%S")
    );
    let run = upload(&app, &format!("connector_id={connector_id}"), csv).await;
    assert_eq!(run.status, 201, "{}", run.body);
    assert_eq!(run.body["matched"], 1, "{}", run.body);
    let run_id = run.body["id"].as_str().unwrap().to_owned();

    let db = &app.state.db;
    let connector = db.connector(&connector_id).await.unwrap().unwrap();
    let line = |key: &str, matched: bool| AppliedLine {
        line: ReportLine {
            line_no: 2,
            key: key.to_owned(),
            kind: "charge".into(),
            reference: reference.clone(),
            intent: None,
            amount: 1500,
            fee: 0,
            currency: "USD".into(),
            created: now,
            malformed: None,
            charge_only: false,
        },
        kind: LineKind::Charge,
        payment_id: Some(payment.clone()),
        refund_id: None,
        matched,
        journal_id: None,
    };
    let chunk = |lines: Vec<AppliedLine>| ChunkWrite {
        lines,
        ..ChunkWrite::default()
    };
    // The same line again (another node classified it before this run applied it).
    let again = db
        .apply_chunk(&connector, &run_id, &chunk(vec![line("txn_a", true)]))
        .await;
    assert!(matches!(again, Ok(None)), "{again:?}");
    // The same capture matched by another line.
    let second = db
        .apply_chunk(&connector, &run_id, &chunk(vec![line("txn_b", true)]))
        .await;
    assert!(matches!(second, Ok(None)), "{second:?}");
    // A line naming it that did not match is recorded beside the match.
    let unmatched = db
        .apply_chunk(&connector, &run_id, &chunk(vec![line("txn_c", false)]))
        .await;
    assert!(matches!(unmatched, Ok(Some(_))), "{unmatched:?}");
    assert_eq!(
        scalar(
            &app,
            &format!("SELECT count(*) FROM settlement_lines WHERE payment_id = '{payment}'")
        )
        .await,
        2
    );

    // The lines' references stay enforced without per-line foreign keys.
    let sql = app.sql().await;
    let insert = |connector: &str, run: &str| {
        format!(
            "INSERT INTO settlement_lines (connector_id, line_key, run_id, line_no, kind, reference, amount, fee,
                 currency, created, outcome)
             VALUES ('{connector}', 'txn_z', '{run}', 9, 'payout', 'po_1', -100, 0, 'USD', now(), 'matched')"
        )
    };
    for (c, r) in [("mca_nobody", run_id.as_str()), (connector_id.as_str(), "rcn_nothing")] {
        let err = sql.batch_execute(&insert(c, r)).await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{err}");
    }
    let err = sql
        .batch_execute("UPDATE settlement_lines SET run_id = 'rcn_other'")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::RESTRICT_VIOLATION), "{err}");
    let err = sql
        .batch_execute(&format!("DELETE FROM reconciliation_runs WHERE id = '{run_id}'"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{err}");
    assert!(db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn a_settlement_written_from_a_stale_payment_is_refused_and_lands_once() {
    // The narrow state-only update is fenced by the payment's version like the full one: a
    // settlement computed from a copy that another writer moved past is refused as stale.
    use payrail::actors::payment_flow::settle_commit_standalone;
    use payrail::adapters::postgres::commit::CommitError;

    // No sandbox events: one applied between the read and the first settlement would make that
    // one stale too (this test writes around the payment's actor on purpose).
    let app = spawn_app_with(|c| {
        quiet(c);
        c.psp.sandbox.webhooks = false;
    })
    .await;
    let paid = app.pay(2500, "pm_card_visa", "automatic", true).await;
    let id = payrail::domain::PaymentId::parse(paid.body["payment_id"].as_str().unwrap()).unwrap();
    let db = &app.state.db;
    let (stale, _) = db.load_payment(&id).await.unwrap().unwrap();
    let first = settle_commit_standalone(&stale, chrono::Utc::now()).unwrap();
    assert!(first.state_only);
    db.commit_batch(&[&first], 0).await.unwrap();
    let again = settle_commit_standalone(&stale, chrono::Utc::now()).unwrap();
    assert!(matches!(db.commit_batch(&[&again], 0).await, Err(CommitError::Stale)));
    let (now, _) = db.load_payment(&id).await.unwrap().unwrap();
    assert_eq!(now.status().as_str(), "settled");
    assert_eq!(now.version, stale.version + 1);
    // The card and the routing the narrow update does not write are as they were.
    assert_eq!((&now.card, &now.routing), (&stale.card, &stale.routing));
    let id_str = id.to_string();
    assert_eq!(
        scalar(
            &app,
            &format!(
                "SELECT count(*) FROM payment_transitions WHERE payment_id = '{id_str}' AND to_status = 'settled'"
            )
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &app,
            &format!("SELECT count(*) FROM outbox WHERE payment_id = '{id_str}' AND event_type = 'payment.settled'")
        )
        .await,
        1
    );
}
