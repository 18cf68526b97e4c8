//! The review's money-safety findings, reproduced from outside against the running server
//! (docs/RELIABILITY.md, "Findings and their fixes"). The deterministic simulation covers
//! the interleavings; these prove the fixes hold with the real PostgreSQL and NATS.

use std::time::Duration;

use payrail::adapters::postgres::commit::{Commit, CommitError, IdempotencyWrite, Transition};
use payrail::adapters::postgres::idempotency::Begin;
use payrail::domain::record::now;
use payrail::domain::{Currency, Money, Payment, PaymentId, Status};
use serde_json::json;

use crate::events::{journals, send_event, wait_for};
use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

async fn refund_as(app: &TestApp, client: &awc::Client, payment: &str, key: &str, amount: i64) -> Option<u16> {
    let body = json!({ "amount": { "value": amount, "currency": "USD" } }).to_string();
    let sent = client
        .post(format!("{}/api/v1/payments/{payment}/refunds", app.address))
        .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
        .insert_header(("Idempotency-Key", key))
        .insert_header(("Content-Type", "application/json"))
        .send_body(body)
        .await;
    sent.ok().map(|r| r.status().as_u16())
}

async fn refunds_of(app: &TestApp, payment: &str) -> Vec<(String, i64)> {
    app.sql()
        .await
        .query(
            "SELECT id, amount FROM refunds WHERE payment_id = $1 ORDER BY created_at",
            &[&payment],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Finding 1, as the review reproduced it (times scaled down): a slow PSP, three refunds
/// queued ahead on one payment, refund K sent and given up on, K retried after its key's
/// lease ran out. Before the fix: two refunds of K's amount. Now: one.
#[actix_web::test]
async fn a_retry_that_takes_over_a_queued_key_refunds_once() {
    let app = spawn_app_with(|c| {
        c.psp.sandbox.latency_ms = 600;
        c.idempotency.in_flight_lease_ms = 300;
    })
    .await;
    let p = app.pay(1000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ahead: Vec<_> = (0..3)
        .map(|i| {
            let (app_client, address, p) = (app.client.clone(), app.address.clone(), p.clone());
            actix_rt::spawn(async move {
                app_client
                    .post(format!("{address}/api/v1/payments/{p}/refunds"))
                    .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
                    .insert_header(("Idempotency-Key", format!("ahead-{i}")))
                    .insert_header(("Content-Type", "application/json"))
                    .send_body(json!({ "amount": { "value": 100, "currency": "USD" } }).to_string())
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // K arrives behind them; its client gives up long before its turn.
    wait_for("the refunds ahead to be queued", async || {
        app.state
            .registry
            .live_mailbox(&PaymentId::parse(&p).unwrap())
            .map(|m| m.depth() >= 2)
            .unwrap_or(false)
    })
    .await;
    let impatient = awc::Client::builder().timeout(Duration::from_millis(100)).finish();
    assert_eq!(
        refund_as(&app, &impatient, &p, "refund-K", 200).await,
        None,
        "the client gave up"
    );
    // The retry comes once the lease has run out, and waits its turn.
    actix_rt::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(refund_as(&app, &app.client, &p, "refund-K", 200).await, Some(201));
    for h in ahead {
        assert_eq!(h.await.unwrap().unwrap(), 201);
    }
    let refunds = refunds_of(&app, &p).await;
    assert_eq!(
        refunds.iter().filter(|(_, a)| *a == 200).count(),
        1,
        "K refunded once: {refunds:?}"
    );
    assert_eq!(refunds.iter().map(|(_, a)| a).sum::<i64>(), 500);
    // And the key keeps answering with that one refund.
    assert_eq!(refund_as(&app, &app.client, &p, "refund-K", 200).await, Some(201));
    assert_eq!(refunds_of(&app, &p).await.len(), 4);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

/// Finding 5, as the review reproduced it: capture 1,000, refund 400 before the dispute
/// opens. The sandbox disputes what is left (600), and a PSP event claiming more is clamped
/// to what is left and kept as a payment exception.
#[actix_web::test]
async fn a_dispute_after_a_refund_takes_only_what_is_left() {
    let app = spawn_app_with(|c| c.psp.sandbox.dispute_delay_ms = 1_500).await;
    let r = app.pay(1000, "pm_card_createDispute", "manual", true).await;
    let p = r.body["payment_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.post(&format!("/api/v1/payments/{p}/capture"), json!({}))
            .await
            .status,
        200
    );
    let refund = app
        .post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 400, "currency": "USD" } }),
        )
        .await;
    assert_eq!(refund.status, 201, "{}", refund.body);
    wait_for("the sandbox's dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "chargeback_open"
    })
    .await;
    let disputes = app.get("/api/v1/disputes").await.body;
    assert_eq!(disputes["data"][0]["amount"]["value"], 600, "{disputes}");
    let debited: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT coalesce(sum(e.debit), 0)::int8 FROM entries e JOIN journals j ON j.id = e.journal_id
             WHERE j.payment_id = $1 AND j.kind = 'dispute_opened' AND e.account LIKE 'merchant_payable:%'",
            &[&p],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        debited, 600,
        "the merchant is debited what is left, not the whole charge"
    );

    // A PSP that disputes the whole charge anyway: clamped, and an exception for an operator.
    let q = app.pay(1000, "pm_card_visa", "automatic", true).await.body;
    let (q, pi) = (
        q["payment_id"].as_str().unwrap().to_owned(),
        q["psp_reference"].as_str().unwrap().to_owned(),
    );
    app.post(
        &format!("/api/v1/payments/{q}/refunds"),
        json!({ "amount": { "value": 400, "currency": "USD" } }),
    )
    .await;
    let dispute = json!({ "id": "du_whole", "object": "dispute", "amount": 1000, "currency": "usd",
                          "reason": "fraudulent", "status": "needs_response", "payment_intent": pi });
    assert_eq!(
        send_event(&app, "evt_whole", "charge.dispute.created", dispute).await,
        200
    );
    wait_for("the clamped dispute", async || {
        app.get(&format!("/api/v1/payments/{q}")).await.body["status"] == "chargeback_open"
    })
    .await;
    let disputes = app.get("/api/v1/disputes").await.body;
    let clamped = disputes["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["payment_id"] == q.as_str())
        .unwrap();
    assert_eq!(clamped["amount"]["value"], 600, "{disputes}");
    let exceptions: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM payment_exceptions WHERE payment_id = $1", &[&q])
        .await
        .unwrap()
        .get(0);
    assert_eq!(exceptions, 1);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

/// Findings 2 and 7: a dispute closed before it was opened is not marked done: it is
/// redelivered, then parked as a dead letter with its envelope; once the dispute opens, an
/// operator replays it and it closes the dispute, once, however often it is replayed.
#[actix_web::test]
async fn an_event_before_its_predecessor_is_parked_then_replayed_once() {
    let app = spawn_app_with(|c| c.nats.max_deliver = 2).await;
    let token = app.state.config.admin.token.clone();
    let r = app.pay(3000, "pm_card_visa", "automatic", true).await.body;
    let (p, pi) = (
        r["payment_id"].as_str().unwrap().to_owned(),
        r["psp_reference"].as_str().unwrap().to_owned(),
    );
    let closed = json!({ "id": "du_7", "object": "dispute", "amount": 3000, "status": "won", "payment_intent": pi });
    assert_eq!(
        send_event(&app, "evt_closed_early", "charge.dispute.closed", closed).await,
        200
    );
    wait_for("the dead letter", async || {
        app.request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
            .await
            .body["total"]
            == 1
    })
    .await;
    let list = app
        .request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
        .await
        .body;
    let d = &list["data"][0];
    assert_eq!(
        (d["event_id"].as_str(), d["replayable"].as_bool()),
        (Some("evt_closed_early"), Some(true)),
        "{list}"
    );
    let id = d["id"].as_i64().unwrap();
    let processed: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_id = 'evt_closed_early'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 0, "not recorded as done");
    let m = app.request("GET", "/metrics", None, None, None).await;
    assert!(String::from_utf8_lossy(&m.raw).contains("payrail_dead_letters_unreplayed 1"));

    let opened = json!({ "id": "du_7", "object": "dispute", "amount": 3000, "currency": "usd",
                         "reason": "fraudulent", "status": "needs_response", "payment_intent": pi });
    send_event(&app, "evt_opened", "charge.dispute.created", opened).await;
    wait_for("the dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "chargeback_open"
    })
    .await;
    let replay = format!("/admin/v1/dead_letters/{id}/replay");
    assert_eq!(
        app.request("POST", &replay, Some(DEMO_KEY), None, None).await.status,
        401
    );
    for _ in 0..2 {
        let r = app.request("POST", &replay, Some(&token), None, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    wait_for("the won dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "settled"
    })
    .await;
    assert_eq!(journals(&app, &p).await, ["capture", "dispute_opened", "dispute_won"]);
    assert_eq!(
        app.request("POST", "/admin/v1/dead_letters/999999/replay", Some(&token), None, None)
            .await
            .status,
        404
    );
    let m = app.request("GET", "/metrics", None, None, None).await;
    assert!(String::from_utf8_lossy(&m.raw).contains("payrail_dead_letters_unreplayed 0"));
}

/// Finding 9: two payments whose PSP disputes carry the same reference are two disputes;
/// closing one leaves the other open.
#[actix_web::test]
async fn dispute_references_are_scoped_to_their_payment() {
    let app = spawn_app().await;
    let mut payments = Vec::new();
    for n in 0..2 {
        let r = app.pay(2000, "pm_card_visa", "automatic", true).await.body;
        let (p, pi) = (
            r["payment_id"].as_str().unwrap().to_owned(),
            r["psp_reference"].as_str().unwrap().to_owned(),
        );
        let opened = json!({ "id": "du_same", "object": "dispute", "amount": 2000, "currency": "usd",
                             "reason": "fraudulent", "status": "needs_response", "payment_intent": pi });
        send_event(&app, &format!("evt_open_{n}"), "charge.dispute.created", opened).await;
        payments.push((p, pi));
    }
    for (p, _) in &payments {
        wait_for("both disputes", async || {
            app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "chargeback_open"
        })
        .await;
    }
    let closed = json!({ "id": "du_same", "object": "dispute", "amount": 2000, "status": "won",
                         "payment_intent": payments[1].1 });
    send_event(&app, "evt_close_1", "charge.dispute.closed", closed).await;
    let second = &payments[1].0;
    wait_for("the second dispute won", async || {
        app.get(&format!("/api/v1/payments/{second}")).await.body["status"] == "settled"
    })
    .await;
    let first = app.get(&format!("/api/v1/payments/{}", payments[0].0)).await.body;
    assert_eq!(first["status"], "chargeback_open", "{first}");
}

/// Finding 10: a payment's refunds page through without a silent cut-off.
#[actix_web::test]
async fn a_payments_refunds_page_through() {
    let app = spawn_app().await;
    let p = app.pay(1000, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        let r = app
            .post(
                &format!("/api/v1/payments/{p}/refunds"),
                json!({ "amount": { "value": 100, "currency": "USD" } }),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let page = app.get(&format!("/api/v1/payments/{p}/refunds?limit=2")).await.body;
    assert_eq!(
        (page["data"].as_array().unwrap().len(), page["has_more"].as_bool()),
        (2, Some(true))
    );
    let last = page["data"][1]["refund_id"].as_str().unwrap();
    let rest = app
        .get(&format!("/api/v1/payments/{p}/refunds?limit=2&starting_after={last}"))
        .await
        .body;
    assert_eq!(
        (rest["data"].as_array().unwrap().len(), rest["has_more"].as_bool()),
        (1, Some(false))
    );
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}/refunds?limit=0")).await.status,
        400
    );
}

/// Finding 1 for create: a create whose key was taken over while it waited commits nothing.
#[actix_web::test]
async fn a_create_commit_that_lost_its_key_inserts_nothing() {
    let app = spawn_app().await;
    let db = &app.state.db;
    let merchant = app.first_merchant().await;
    let key = "f".repeat(64);
    let first = db.idempotency_begin(&merchant, &key, b"fp", 1).await.unwrap();
    assert_eq!(
        first,
        Begin::Proceed {
            resource_id: None,
            fence: 1
        }
    );
    let mut taken = None;
    wait_for("the lease to run out and a retry to take the key over", async || {
        taken = Some(db.idempotency_begin(&merchant, &key, b"fp", 60_000).await.unwrap());
        matches!(taken, Some(Begin::Proceed { .. }))
    })
    .await;
    assert_eq!(
        taken,
        Some(Begin::Proceed {
            resource_id: None,
            fence: 2
        })
    );
    let create = |fence: i64| {
        let at = now();
        let payment = Payment {
            order_id: "ord_fence".into(),
            fee_bps: 290,
            fee_fixed: 30,
            ..Payment::pending(
                PaymentId::generate(),
                merchant.clone(),
                Money::new(500, Currency::parse("USD").unwrap()),
                "pm_card_visa".into(),
                "sandbox".into(),
                at,
            )
        };
        Commit {
            transition: Some(Transition {
                seq: 0,
                from: None,
                to: Status::Pending,
                cause: "api.create".into(),
            }),
            idempotency: Some(IdempotencyWrite {
                merchant_id: merchant.clone(),
                key: key.clone(),
                resource_id: Some(payment.id.to_string()),
                response: Some((201, b"{}".to_vec())),
                fence,
                claim: None,
            }),
            payment: Some(payment),
            ..Commit::default()
        }
    };
    assert!(matches!(db.commit(&create(1)).await, Err(CommitError::Fenced)));
    assert_eq!(app.count("payments").await, 0, "the fenced create rolled back whole");
    db.commit(&create(2)).await.expect("the key's holder commits");
    assert_eq!(app.count("payments").await, 1);
}
