//! PSP events through the real NATS JetStream: verified at the bridge, applied once by the
//! payment's actor however often they arrive, never moving a payment backwards.

use std::time::{Duration, Instant};

use payrail::adapters::nats::PspEvent;
use payrail::adapters::postgres::outbox::Relayed;
use payrail::adapters::psp::signature::sign_stripe;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

/// A Stripe-format event for a payment intent (or a charge-level object), signed like the PSP.
pub(crate) async fn send_event(app: &TestApp, id: &str, event_type: &str, object: Value) -> u16 {
    let body = json!({ "id": id, "object": "event", "type": event_type, "created": 1, "data": { "object": object } })
        .to_string();
    let header = sign_stripe(
        body.as_bytes(),
        &app.state.config.webhooks.secret,
        chrono::Utc::now().timestamp(),
    );
    let r = app
        .client
        .post(format!("{}/internal/webhooks/psp/sandbox", app.address))
        .insert_header(("Stripe-Signature", header))
        .send_body(body)
        .await
        .unwrap();
    r.status().as_u16()
}

/// Waits until the server has counted a PSP event with `outcome` (`payrail_psp_events_total`).
pub(crate) async fn wait_for_event_outcome(app: &TestApp, outcome: &str) {
    let needle = format!("outcome=\"{outcome}\"");
    wait_for(&format!("a PSP event with outcome {outcome}"), async || {
        let m = app.request("GET", "/metrics", None, None, None).await;
        String::from_utf8_lossy(&m.raw).contains(&needle)
    })
    .await;
}

pub(crate) async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A sandbox `payment_intent.succeeded` as the bridge carries it, for a test to hand on itself.
fn succeeded(event_id: &str, reference: &str, object: &Value, unrecorded: bool) -> PspEvent {
    PspEvent {
        provider: "sandbox".into(),
        event_id: event_id.into(),
        event_type: "payment_intent.succeeded".into(),
        reference: reference.into(),
        object: serde_json::to_vec(object).unwrap(),
        raw: b"{}".to_vec(),
        merchant: None,
        unrecorded,
    }
}

async fn processed(app: &TestApp, event_id: &str) -> bool {
    let db = app.sql().await;
    db.query_opt("SELECT 1 FROM processed_events WHERE event_id = $1", &[&event_id])
        .await
        .unwrap()
        .is_some()
}

pub(crate) async fn journals(app: &TestApp, payment: &str) -> Vec<String> {
    let db = app.sql().await;
    db.query(
        "SELECT kind FROM journals WHERE payment_id = $1 ORDER BY created_at",
        &[&payment],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The consumer marks an event its look-up found unrecorded, and the actor then saves its own
/// look-up; a mark gone stale (a partition handed over, another node recorded the event in
/// between) is caught by `processed_events`' primary key, and the actor's second run, after
/// reloading, looks again and answers with a duplicate: the event is applied once.
#[actix_web::test]
async fn an_event_marked_unrecorded_after_it_was_recorded_is_applied_once() {
    use payrail::actors::{Op, PaymentCall};
    use payrail::domain::{MerchantId, PaymentId};
    let app = spawn_app().await;
    let r = app.pay(4200, "pm_card_visa", "manual", true).await;
    let (p, pi, merchant) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
        r.body["merchant_id"].as_str().unwrap().to_owned(),
    );
    let object =
        json!({ "id": pi, "object": "payment_intent", "amount": 4200, "amount_received": 4200, "currency": "usd" });
    assert_eq!(
        send_event(&app, "evt_marked", "payment_intent.succeeded", object.clone()).await,
        200
    );
    wait_for("the event to be recorded", async || processed(&app, "evt_marked").await).await;
    let stale = succeeded("evt_marked", &pi, &object, true);
    let call = PaymentCall::new(
        MerchantId::from_trusted(merchant),
        Op::PspEvent(std::sync::Arc::new(stale)),
        None,
    );
    let reply = app
        .state
        .registry
        .call(&PaymentId::from_trusted(p.clone()), call)
        .await
        .expect("answered, after the key refused the second record");
    assert_eq!(reply.status, payrail::actors::payment_flow::DUPLICATE_EVENT);
    assert_eq!(journals(&app, &p).await, ["capture"]);
    assert_eq!(app.count("processed_events WHERE event_id = 'evt_marked'").await, 1);
}

#[actix_web::test]
async fn an_event_delivered_three_times_and_again_after_the_window_applies_once() {
    let app = spawn_app().await;
    let r = app.pay(4200, "pm_card_visa", "manual", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let object =
        json!({ "id": pi, "object": "payment_intent", "amount": 4200, "amount_received": 4200, "currency": "usd" });
    for _ in 0..3 {
        assert_eq!(
            send_event(&app, "evt_cap_1", "payment_intent.succeeded", object.clone()).await,
            200
        );
    }
    wait_for("the capture", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "captured"
    })
    .await;
    // Past JetStream's duplicate window: the same event published afresh, under another msg id.
    let again = succeeded("evt_cap_1", &pi, &object, false);
    let nats = &app.state.nats;
    let subject = nats.psp_subject(
        payrail::adapters::nats::partition(&pi, app.state.config.nats.partitions),
        "sandbox",
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "after-the-window");
    nats.jetstream
        .publish_with_headers(subject, headers, rmp_serde::to_vec_named(&again).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the late duplicate to be seen", async || {
        let m = app.request("GET", "/metrics", None, None, None).await;
        String::from_utf8_lossy(&m.raw)
            .contains("payrail_psp_events_total{provider=\"sandbox\",outcome=\"duplicate\"} 1")
    })
    .await;
    assert_eq!(journals(&app, &p).await, ["capture"]);
    let trail = app.get(&format!("/api/v1/payments/{p}/events")).await.body;
    let causes: Vec<&str> = trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["api.create", "api.confirm", "psp.payment_intent.succeeded"]);
}

#[actix_web::test]
async fn a_late_success_for_a_captured_payment_moves_nothing() {
    let app = spawn_app().await;
    let r = app.pay(1000, "pm_card_visa", "automatic", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let stored = async || {
        let db = app.sql().await;
        let r = db
            .query_one(
                "SELECT xmin::text, version, updated_at FROM payments WHERE id = $1",
                &[&p],
            )
            .await
            .unwrap();
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, chrono::DateTime<chrono::Utc>>(2),
        )
    };
    let captured = stored().await;
    // Authorization reported after the capture, then the success: both are in the past.
    let object = json!({ "id": pi, "object": "payment_intent", "amount": 1000, "amount_received": 1000 });
    assert_eq!(
        send_event(
            &app,
            "evt_late_auth",
            "payment_intent.amount_capturable_updated",
            object.clone()
        )
        .await,
        200
    );
    assert_eq!(
        send_event(&app, "evt_late_ok", "payment_intent.succeeded", object).await,
        200
    );
    wait_for("both events", async || {
        processed(&app, "evt_late_auth").await && processed(&app, "evt_late_ok").await
    })
    .await;
    let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
    assert_eq!(
        (payment["status"].as_str(), payment["amount_captured"].as_i64()),
        (Some("captured"), Some(1000))
    );
    assert_eq!(journals(&app, &p).await, ["capture"]);
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}/events")).await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Recorded through the payment's actor without rewriting the payment: same row version,
    // same `updated_at` (docs/API.md, "PSP events").
    assert_eq!(
        stored().await,
        captured,
        "an event that moves nothing rewrote the payment"
    );
}

#[actix_web::test]
async fn an_event_that_moves_nothing_keeps_a_3ds_payments_redirect() {
    let app = spawn_app().await;
    let r = app.pay(4200, "pm_card_threeDSecureRequired", "manual", true).await;
    assert_eq!(r.body["status"], "requires_action", "{}", r.body);
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let redirect = r.body["next_action"].clone();
    assert_eq!(redirect["type"], "three_d_secure");
    // News the payment has no input for (two types payrail does not act on): both are
    // recorded, and neither may take away the redirect the customer still has to follow.
    let object = json!({ "id": pi, "object": "payment_intent", "amount": 4200 });
    assert_eq!(
        send_event(&app, "evt_3ds_other", "payment_intent.created", object.clone()).await,
        200
    );
    assert_eq!(
        send_event(&app, "evt_3ds_processing", "payment_intent.processing", object).await,
        200
    );
    wait_for("both events", async || {
        processed(&app, "evt_3ds_other").await && processed(&app, "evt_3ds_processing").await
    })
    .await;
    let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
    assert_eq!(payment["status"], "requires_action", "{payment}");
    assert_eq!(payment["next_action"], redirect, "{payment}");
    // And the customer can still finish it.
    let done = app.complete_3ds(&pi).await;
    assert_eq!(
        (done.status, done.body["status"].as_str()),
        (200, Some("authorized")),
        "{}",
        done.body
    );
    assert!(done.body["next_action"].is_null());
}

#[actix_web::test]
async fn a_dispute_opens_and_is_won_with_its_journals_posted_once() {
    let app = spawn_app().await;
    let r = app.pay(5000, "pm_card_createDispute", "automatic", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let before = app.get("/api/v1/balance").await.body["balances"][0]["payable"]
        .as_i64()
        .unwrap();
    let dispute = json!({ "id": "du_1", "object": "dispute", "amount": 5000, "currency": "usd", "reason": "fraudulent",
                          "status": "needs_response", "payment_intent": pi });
    for _ in 0..2 {
        assert_eq!(
            send_event(&app, "evt_dp_open", "charge.dispute.created", dispute.clone()).await,
            200
        );
    }
    wait_for("the dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "chargeback_open"
    })
    .await;
    let list = app.get("/api/v1/disputes").await.body;
    let d = &list["data"][0];
    assert_eq!(
        (
            d["status"].as_str(),
            d["psp_reference"].as_str(),
            d["amount"]["value"].as_i64()
        ),
        (Some("needs_response"), Some("du_1"), Some(5000))
    );
    let id = d["dispute_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get(&format!("/api/v1/disputes/{id}")).await.body["payment_id"],
        p.as_str()
    );
    assert_eq!(
        app.get("/api/v1/balance").await.body["balances"][0]["payable"]
            .as_i64()
            .unwrap(),
        before - 5000
    );
    // A refund is not allowed while disputed.
    assert_eq!(
        app.post(&format!("/api/v1/payments/{p}/refunds"), json!({}))
            .await
            .status,
        409
    );

    let closed = json!({ "id": "du_1", "object": "dispute", "amount": 5000, "status": "won", "payment_intent": pi });
    assert_eq!(
        send_event(&app, "evt_dp_won", "charge.dispute.closed", closed).await,
        200
    );
    wait_for("the won dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "settled"
    })
    .await;
    assert_eq!(app.get(&format!("/api/v1/disputes/{id}")).await.body["status"], "won");
    assert_eq!(journals(&app, &p).await, ["capture", "dispute_opened", "dispute_won"]);
    assert_eq!(
        app.get("/api/v1/balance").await.body["balances"][0]["payable"]
            .as_i64()
            .unwrap(),
        before
    );
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
    // Another merchant cannot see it.
    let other = app.new_merchant().await;
    assert_eq!(
        app.request("GET", &format!("/api/v1/disputes/{id}"), Some(&other), None, None)
            .await
            .status,
        404
    );
}

#[actix_web::test]
async fn a_lost_dispute_ends_refunded_without_touching_amount_refunded() {
    let app = spawn_app().await;
    let r = app.pay(3000, "pm_card_visa", "automatic", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let opened = json!({ "id": "du_2", "amount": 3000, "payment_intent": pi, "status": "needs_response" });
    send_event(&app, "evt_dp2_open", "charge.dispute.created", opened).await;
    wait_for("the dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "chargeback_open"
    })
    .await;
    send_event(
        &app,
        "evt_dp2_lost",
        "charge.dispute.closed",
        json!({ "id": "du_2", "status": "lost", "payment_intent": pi }),
    )
    .await;
    wait_for("the lost dispute", async || {
        app.get(&format!("/api/v1/payments/{p}")).await.body["status"] == "refunded"
    })
    .await;
    let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
    assert_eq!(payment["amount_refunded"], 0);
    assert_eq!(journals(&app, &p).await, ["capture", "dispute_opened"]);
}

#[actix_web::test]
async fn a_refund_confirmed_by_webhook_settles_once() {
    let app = spawn_app_with(|c| c.psp.sandbox.refund_delay_ms = 60_000).await;
    let r = app.pay(2000, "pm_card_visa", "automatic", true).await;
    let (p, pi) = (
        r.body["payment_id"].as_str().unwrap().to_owned(),
        r.body["psp_reference"].as_str().unwrap().to_owned(),
    );
    let refund = app
        .post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 500, "currency": "USD" } }),
        )
        .await;
    assert_eq!(
        (refund.status, refund.body["status"].as_str()),
        (201, Some("pending")),
        "{}",
        refund.body
    );
    let reference = refund.body["psp_reference"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get("/api/v1/balance").await.body["balances"][0]["pending_refunds"],
        500
    );
    let object =
        json!({ "id": reference, "object": "refund", "amount": 500, "status": "succeeded", "payment_intent": pi });
    for _ in 0..2 {
        send_event(&app, "evt_re_ok", "charge.refund.updated", object.clone()).await;
    }
    let id = refund.body["refund_id"].as_str().unwrap().to_owned();
    wait_for("the refund", async || {
        app.get(&format!("/api/v1/refunds/{id}")).await.body["status"] == "succeeded"
    })
    .await;
    let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
    assert_eq!(
        (payment["status"].as_str(), payment["amount_refunded"].as_i64()),
        (Some("captured"), Some(500))
    );
    assert_eq!(journals(&app, &p).await, ["capture", "refund"]);
    assert_eq!(
        app.get("/api/v1/balance").await.body["balances"][0]["pending_refunds"],
        0
    );
}

#[actix_web::test]
async fn bad_signatures_stale_timestamps_and_malformed_bodies_are_400_and_publish_nothing() {
    let app = spawn_app().await;
    let url = format!("{}/internal/webhooks/psp/sandbox", app.address);
    let body = r#"{"id":"evt_x","type":"payment_intent.succeeded","data":{"object":{"id":"pi_x"}}}"#;
    let now = chrono::Utc::now().timestamp();
    let cases = [
        (None, body.to_owned()),
        (Some(sign_stripe(body.as_bytes(), "whsec_wrong", now)), body.to_owned()),
        (
            Some(sign_stripe(
                body.as_bytes(),
                &app.state.config.webhooks.secret,
                now - 301,
            )),
            body.to_owned(),
        ),
        (
            Some(sign_stripe(b"not json", &app.state.config.webhooks.secret, now)),
            "not json".to_owned(),
        ),
        (
            Some(sign_stripe(
                b"{\"id\":\"evt_y\"}",
                &app.state.config.webhooks.secret,
                now,
            )),
            "{\"id\":\"evt_y\"}".to_owned(),
        ),
    ];
    for (header, body) in cases {
        let mut req = app.client.post(&url);
        if let Some(h) = header {
            req = req.insert_header(("Stripe-Signature", h));
        }
        let mut r = req.send_body(body).await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{:?}", r.body().await);
    }
    let adyen = app
        .client
        .post(format!("{}/internal/webhooks/psp/adyen", app.address))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(adyen.status().as_u16(), 400);
    assert_eq!(
        app.client
            .post(format!("{}/internal/webhooks/psp/paypal", app.address))
            .send_body("{}")
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    let mut stream = app
        .state
        .nats
        .jetstream
        .get_stream(app.state.nats.psp_events_stream())
        .await
        .unwrap();
    // Nothing was ever published (a work queue deletes what was acknowledged: not `messages`).
    assert_eq!(
        stream.info().await.unwrap().state.last_sequence,
        0,
        "nothing was published"
    );
}

#[actix_web::test]
async fn a_full_event_stream_refuses_new_events_and_keeps_every_unapplied_one() {
    // Room for two events; unknown payments' events stay unapplied (retried, not parked).
    let app = spawn_app_with(|c| {
        c.nats.max_stream_messages = 2;
        c.nats.max_deliver = 1_000;
    })
    .await;
    let stream = || async {
        app.state
            .nats
            .jetstream
            .get_stream(app.state.nats.psp_events_stream())
            .await
            .unwrap()
    };
    let info = async || stream().await.info().await.unwrap().state.clone();
    // An applied event leaves the stream: the sandbox's own events for a payment.
    let paid = app.pay(1_000, "pm_card_visa", "automatic", true).await;
    assert_eq!(paid.body["status"], "captured", "{}", paid.body);
    wait_for_event_outcome(&app, "applied").await;
    wait_for("the applied events to leave the stream", async || {
        info().await.messages == 0
    })
    .await;
    let orphan = |n: u32| json!({ "id": format!("pi_nobody_{n}"), "object": "payment_intent", "amount": 100 });
    for n in 1..=2 {
        let status = send_event(&app, &format!("evt_orphan_{n}"), "payment_intent.succeeded", orphan(n)).await;
        assert_eq!(status, 200);
    }
    // Full: the next one is refused, so that the PSP sends it again later; none is dropped.
    let status = send_event(&app, "evt_orphan_3", "payment_intent.succeeded", orphan(3)).await;
    assert_eq!(status, 503);
    let state = info().await;
    assert_eq!((state.messages, state.first_sequence), (2, state.last_sequence - 1));
    let first = stream().await.get_raw_message(state.first_sequence).await.unwrap();
    let first: PspEvent = rmp_serde::from_slice(&first.payload).unwrap();
    assert_eq!(first.event_id, "evt_orphan_1");
}

#[actix_web::test]
async fn an_event_for_an_unknown_payment_is_retried_then_parked_as_a_dead_letter() {
    let app = spawn_app_with(|c| c.nats.max_deliver = 2).await;
    let object = json!({ "id": "pi_nobody", "object": "payment_intent", "amount": 100 });
    assert_eq!(
        send_event(&app, "evt_orphan", "payment_intent.succeeded", object).await,
        200
    );
    // Events that name no payment at all are recorded and ignored, not parked.
    assert_eq!(
        send_event(&app, "evt_other", "customer.created", json!({ "id": "cus_1" })).await,
        200
    );
    let token = app.state.config.admin.token.clone();
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
        (
            d["event_id"].as_str(),
            d["reference"].as_str(),
            d["deliveries"].as_i64()
        ),
        (Some("evt_orphan"), Some("pi_nobody"), Some(2))
    );
    wait_for("the ignored event", async || processed(&app, "evt_other").await).await;
    assert_eq!(
        app.request("GET", "/admin/v1/dead_letters", Some(DEMO_KEY), None, None)
            .await
            .status,
        401
    );
    let m = app.request("GET", "/metrics", None, None, None).await;
    assert!(String::from_utf8_lossy(&m.raw).contains("outcome=\"dead_lettered\"} 1"));
}

#[actix_web::test]
async fn the_sandbox_drives_refund_confirmations_and_disputes_by_itself() {
    let app = spawn_app_with(|c| {
        c.psp.sandbox.refund_delay_ms = 200;
        c.psp.sandbox.dispute_delay_ms = 100;
    })
    .await;
    // A refund answered pending, confirmed by the sandbox's own webhook after the delay.
    let p = app.pay(2500, "pm_card_visa", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refund = app
        .post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 1000, "currency": "USD" } }),
        )
        .await;
    assert_eq!(refund.body["status"], "pending");
    let id = refund.body["refund_id"].as_str().unwrap().to_owned();
    wait_for("the confirmation", async || {
        app.get(&format!("/api/v1/refunds/{id}")).await.body["status"] == "succeeded"
    })
    .await;
    assert_eq!(journals(&app, &p).await, ["capture", "refund"]);
    // The dispute card opens its dispute shortly after capture, with nobody's help.
    let d = app.pay(4000, "pm_card_createDispute", "automatic", true).await.body["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the dispute", async || {
        app.get(&format!("/api/v1/payments/{d}")).await.body["status"] == "chargeback_open"
    })
    .await;
    assert_eq!(journals(&app, &d).await, ["capture", "dispute_opened"]);
    assert_eq!(
        app.get("/api/v1/disputes").await.body["data"].as_array().unwrap().len(),
        1
    );
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn chaos_duplicates_reorders_and_delays_change_nothing_twice() {
    let app = spawn_app_with(|c| {
        c.psp.sandbox.chaos.duplicate = 0.5;
        c.psp.sandbox.chaos.reorder = 0.5;
        c.psp.sandbox.chaos.delay_ms = 100;
        c.psp.sandbox.refund_delay_ms = 50;
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let p = app.pay(3000, "pm_card_visa", "manual", true).await.body["payment_id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.post(&format!("/api/v1/payments/{p}/capture"), json!({})).await;
        app.post(
            &format!("/api/v1/payments/{p}/refunds"),
            json!({ "amount": { "value": 1000, "currency": "USD" } }),
        )
        .await;
        ids.push(p);
    }
    for p in &ids {
        wait_for("every refund", async || {
            app.get(&format!("/api/v1/payments/{p}")).await.body["amount_refunded"] == 1000
        })
        .await;
        assert_eq!(journals(&app, p).await, ["capture", "refund"]);
        let payment = app.get(&format!("/api/v1/payments/{p}")).await.body;
        assert_eq!(
            (payment["status"].as_str(), payment["amount_captured"].as_i64()),
            (Some("captured"), Some(3000))
        );
    }
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn a_panic_in_an_event_consumer_is_counted_and_the_event_redelivered() {
    let app = spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let drill = payrail::actors::event_consumer::CONSUMER_PANIC_ONCE;
    assert_eq!(
        send_event(&app, "evt_drill", drill, json!({ "id": "obj_1" })).await,
        200
    );
    wait_for("the redelivered event", async || processed(&app, "evt_drill").await).await;
    assert_eq!(
        app.state
            .event_consumers
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let m = app.request("GET", "/metrics", None, None, None).await;
    let text = String::from_utf8_lossy(&m.raw);
    assert!(
        text.contains("payrail_actor_restarts_total{actor=\"event_consumer\"} 1"),
        "{text}"
    );
    assert!(text.contains("payrail_actors_live{actor=\"event_consumer\"} 8"));
}

#[actix_web::test]
async fn a_refund_confirmation_racing_the_api_response_posts_once() {
    // The sandbox confirms each refund by webhook the moment it answers the refund call, so the
    // event can reach payrail before the API response does; the actor takes it after the
    // refund's own commit, finds nothing left to do, and records it.
    let app = spawn_app().await;
    let r = app.pay(10_000, "pm_card_visa", "automatic", true).await;
    let p = r.body["payment_id"].as_str().unwrap().to_owned();
    for _ in 0..10 {
        let r = app
            .post(
                &format!("/api/v1/payments/{p}/refunds"),
                json!({ "amount": { "value": 100, "currency": "USD" } }),
            )
            .await;
        assert_eq!((r.status, r.body["status"].as_str()), (201, Some("succeeded")));
    }
    wait_for("ten refund confirmations", async || {
        let db = app.sql().await;
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM processed_events WHERE event_type = 'charge.refund.updated'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 10
    })
    .await;
    assert_eq!(journals(&app, &p).await.iter().filter(|k| *k == "refund").count(), 10);
    assert_eq!(
        app.get(&format!("/api/v1/payments/{p}")).await.body["amount_refunded"],
        1000
    );
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

/// An envelope no consumer can read (not MessagePack, or not a PSP event) is parked as a dead
/// letter on its first delivery, its bytes kept, and acknowledged: it never blocks the events
/// behind it on its partition, which are applied.
#[actix_web::test]
async fn an_unreadable_envelope_is_parked_at_once_and_the_events_behind_it_go_on() {
    let app = spawn_app().await;
    let nats = &app.state.nats;
    for partition in 0..app.state.config.nats.partitions {
        nats.jetstream
            .publish(nats.psp_subject(partition, "sandbox"), "not an envelope".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let r = app.pay(900, "pm_card_visa", "automatic", true).await;
    let p = r.body["payment_id"].as_str().unwrap().to_owned();
    wait_for("the payment's own event", async || {
        let db = app.sql().await;
        let n: i64 = db
            .query_one("SELECT count(*) FROM processed_events WHERE payment_id = $1", &[&p])
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    let token = app.state.config.admin.token.clone();
    let partitions = i64::from(app.state.config.nats.partitions);
    wait_for("every unreadable envelope parked", async || {
        app.request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
            .await
            .body["total"]
            == partitions
    })
    .await;
    let db = app.sql().await;
    let rows = db
        .query("SELECT reason, deliveries, raw FROM dead_letters", &[])
        .await
        .unwrap();
    for row in rows {
        let (reason, deliveries, raw): (String, i32, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((reason.as_str(), deliveries), ("unreadable envelope", 1));
        assert_eq!(raw, b"not an envelope");
    }
}

/// A server without the sandbox's webhooks, one payment made and its two events published; and
/// the payment's merchant.
async fn one_payment_published() -> (TestApp, String) {
    let app = spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let merchant = app.pay(700, "pm_card_visa", "automatic", true).await.body["merchant_id"]
        .as_str()
        .unwrap()
        .to_owned();
    outbox_drained(&app).await;
    (app, merchant)
}

/// Waits until the relay has published every committed event.
async fn outbox_drained(app: &TestApp) {
    let db = app.sql().await;
    wait_for("the outbox to drain", async || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM outbox_waiting", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
}

#[actix_web::test]
async fn the_outbox_relay_publishes_each_committed_event_to_the_merchants_subject() {
    let app = spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let r = app.pay(700, "pm_card_visa", "automatic", true).await;
    let merchant = r.body["merchant_id"].as_str().unwrap().to_owned();
    outbox_drained(&app).await;
    let nats = &app.state.nats;
    let mut stream = nats.jetstream.get_stream(nats.events_stream()).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 2, "payment.created and payment.captured");
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(first.subject.as_str(), format!("{}.events.{merchant}", nats.prefix));
    let body: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(body["type"], "payment.created");
}

/// The relay's cursor never passes an event that is not yet committed. A transaction writes an
/// event (the lower id) and stays open while a payment commits two more after it: a relay
/// following ids would publish those and step over the first, which it could then never
/// publish. This one holds the payment's events back until the older transaction ends, then
/// publishes all three in the order of their transactions.
#[actix_web::test]
async fn an_event_of_a_transaction_still_open_is_not_passed_by_the_events_committed_after_it() {
    let (app, merchant) = one_payment_published().await;
    let nats = &app.state.nats;
    let mut stream = nats.jetstream.get_stream(nats.events_stream()).await.unwrap();
    let mut open = app.sql().await;
    let older = open.transaction().await.unwrap();
    let first: i64 = older
        .query_one(
            "INSERT INTO outbox (merchant_id, event_type, body) VALUES ($1, 'test.older', '{}') RETURNING id",
            &[&merchant],
        )
        .await
        .unwrap()
        .get(0);
    let paid = app.pay(800, "pm_card_visa", "automatic", true).await;
    assert_eq!(paid.status, 201);
    // A relay round run here (once the server's own is not in one) takes none of them: it sees
    // them and holds them back.
    let round = loop {
        let round = app
            .state
            .db
            .relay_outbox(500, |rows| async move {
                panic!("a round published {:?}", rows.iter().map(|r| r.id).collect::<Vec<_>>())
            })
            .await
            .unwrap();
        if !round.busy {
            break round;
        }
    };
    assert_eq!(
        round,
        Relayed {
            held: true,
            ..Relayed::default()
        }
    );
    let db = app.sql().await;
    // The payment's events are committed, after the open transaction's in id order too, and
    // wait: the relay has seen them and holds them back.
    let (waiting, after): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE id > $1) FROM outbox_waiting",
                &[&first],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((waiting, after), (2, 2));
    older.commit().await.unwrap();
    outbox_drained(&app).await;
    let mut types = Vec::new();
    for seq in 3..=5 {
        let m = stream.get_raw_message(seq).await.unwrap();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        types.push(body["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(types, ["test.older", "payment.created", "payment.captured"]);
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
}

/// Events that become ready together are published in the order their rows were written, not
/// in the order their transactions took ids: a transaction that took its id first (as a
/// settlement batch does before it waits on a payment's row) writes its event after another
/// transaction has committed one. Both wait for the first to end; then the second's event,
/// written first, goes first.
#[actix_web::test]
async fn events_ready_together_are_published_in_the_order_they_were_written() {
    let (app, merchant) = one_payment_published().await;
    let event = |kind: &str| {
        format!("INSERT INTO outbox (merchant_id, event_type, body) VALUES ('{merchant}', '{kind}', '{{}}')")
    };
    let mut first = app.sql().await;
    let early = first.transaction().await.unwrap();
    early.batch_execute("SELECT pg_current_xact_id()").await.unwrap();
    app.sql()
        .await
        .batch_execute(&event("test.written_first"))
        .await
        .unwrap();
    early.batch_execute(&event("test.written_second")).await.unwrap();
    early.commit().await.unwrap();
    outbox_drained(&app).await;
    let nats = &app.state.nats;
    let stream = nats.jetstream.get_stream(nats.events_stream()).await.unwrap();
    let mut types = Vec::new();
    for seq in 3..=4 {
        let m = stream.get_raw_message(seq).await.unwrap();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        types.push(body["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(types, ["test.written_first", "test.written_second"]);
}

/// A database copied into another PostgreSQL cluster (a logical dump and restore) brings the
/// old cluster's transaction ids, here far ahead of this one's: the cursor would stand in front
/// of every event written from now on. A starting node rebases it: what it had passed stays
/// published, what it had not is published once, and new events follow.
#[actix_web::test]
async fn a_cursor_copied_from_another_cluster_is_rebased_and_no_event_is_lost_or_sent_twice() {
    let (app, merchant) = one_payment_published().await;
    let db = app.sql().await;
    db.batch_execute(&format!(
        "BEGIN;
         UPDATE outbox_cursor SET tx = (pg_current_xact_id()::text::bigint + 1000000000)::text::xid8;
         INSERT INTO outbox (merchant_id, event_type, body, tx)
         VALUES ('{merchant}', 'test.copied', '{{}}', (pg_current_xact_id()::text::bigint + 2000000000)::text::xid8);
         COMMIT;"
    ))
    .await
    .unwrap();
    // The relay will not run on it.
    assert!(app.state.db.relay_outbox(500, |_| async { Vec::new() }).await.is_err());
    assert!(app.state.db.outbox_rebase().await.unwrap());
    assert!(!app.state.db.outbox_rebase().await.unwrap(), "rebased once");
    outbox_drained(&app).await;
    app.pay(800, "pm_card_visa", "automatic", true).await;
    outbox_drained(&app).await;
    let nats = &app.state.nats;
    let mut stream = nats.jetstream.get_stream(nats.events_stream()).await.unwrap();
    let mut types = Vec::new();
    for seq in 1..=stream.info().await.unwrap().state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        types.push(body["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        types,
        [
            "payment.created",
            "payment.captured",
            "test.copied",
            "payment.created",
            "payment.captured"
        ]
    );
}

/// Events are stored as the text payrail wrote (`body`, json); one stored before that (a jsonb
/// `payload`, from a node of an earlier version) is published and read the same way, and a row
/// with both or neither is refused.
#[actix_web::test]
async fn an_event_stored_as_jsonb_before_is_published_and_read_as_one_stored_now() {
    let app = spawn_app_with(|c| c.psp.sandbox.webhooks = false).await;
    let r = app.pay(700, "pm_card_visa", "automatic", true).await;
    let merchant = r.body["merchant_id"].as_str().unwrap().to_owned();
    let db = app.sql().await;
    let legacy: i64 = db
        .query_one(
            "INSERT INTO outbox (merchant_id, event_type, payload)
             VALUES ($1, 'payment.legacy', '{\"id\": \"pay_legacy\", \"note\": \"a  b\", \"n\": [1, 2]}')
             RETURNING id",
            &[&merchant],
        )
        .await
        .unwrap()
        .get(0);
    for (case, columns, values) in [
        ("both", "event_type, payload, body", "'payment.both', '{}', '{}'"),
        ("neither", "event_type", "'payment.none'"),
    ] {
        let err = db
            .execute(
                &format!("INSERT INTO outbox (merchant_id, {columns}) VALUES ($1, {values})"),
                &[&merchant],
            )
            .await
            .expect_err(case);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{case}: {err}"
        );
    }
    outbox_drained(&app).await;
    let nats = &app.state.nats;
    let stream = nats.jetstream.get_stream(nats.events_stream()).await.unwrap();
    let mut published = Vec::new();
    for seq in 1..=3 {
        let m = stream.get_raw_message(seq).await.unwrap();
        published.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    // Compact (jsonb's own key order), whitespace inside strings kept, like the events stored
    // as json beside it.
    let old = published
        .iter()
        .find(|p| p.contains("payment.legacy"))
        .expect("the legacy event");
    assert!(
        old.contains(r#""data":{"object":{"n":[1,2],"id":"pay_legacy","note":"a  b"}}"#),
        "{old}"
    );
    let new = published
        .iter()
        .find(|p| p.contains("payment.created"))
        .expect("payment.created");
    // In the order payrail wrote it.
    assert!(
        new.contains(r#""data":{"object":{"object":"payment","payment_id":"pay_"#),
        "{new}"
    );
    assert!(!new.contains(": ") && !new.contains(", "), "{new}");
    // Read back through the API, both are objects.
    let id = payrail::domain::webhook::event_id(legacy);
    let read = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(
        read.body["data"]["object"],
        json!({ "id": "pay_legacy", "note": "a  b", "n": [1, 2] })
    );
    let list = app.get("/api/v1/events?limit=10").await;
    let types: Vec<&str> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        ["payment.legacy", "payment.captured", "payment.created"],
        "{}",
        list.body
    );
    assert_eq!(
        list.body["data"][2]["data"]["object"]["amount"]["value"], 700,
        "{}",
        list.body
    );
}

/// An event that comes while the commit storing its payment's PSP reference still waits for its
/// ledger batch is applied on its first delivery: the consumer waits for that commit and looks
/// again (`Landing`) instead of sending it back for a redelivery half a second later.
#[actix_web::test]
async fn an_event_racing_its_payments_commit_is_applied_on_its_first_delivery() {
    // Every commit waits 400 ms for company: the sandbox's event, sent as it authorizes, reaches
    // the consumer while the confirm's commit, the one that stores the reference, still waits.
    let app = spawn_app_with(|c| c.ledger.max_wait_us = 400_000).await;
    let r = app.pay(1800, "pm_card_visa", "automatic", true).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (201, Some("captured")),
        "{}",
        r.body
    );
    let metrics = async || {
        let m = app.request("GET", "/metrics", None, None, None).await;
        String::from_utf8_lossy(&m.raw).into_owned()
    };
    wait_for("the sandbox's event to be applied", async || {
        metrics()
            .await
            .contains("payrail_psp_events_total{provider=\"sandbox\",outcome=\"applied\"} 1")
    })
    .await;
    let m = metrics().await;
    assert!(
        !m.contains("outcome=\"unknown_reference\""),
        "the event was sent back for a redelivery: {m}"
    );
}

/// A partition's durable consumer deleted under a running node (an operator recreating it with
/// new settings, say): each worker's pull fails, and the worker makes its consumer again and
/// goes on, rather than pulling an empty batch at once, forever.
#[actix_web::test]
async fn a_deleted_consumer_is_made_again_and_its_events_applied() {
    let app = spawn_app().await;
    let count = async || -> i64 {
        app.sql()
            .await
            .query_one("SELECT count(*) FROM processed_events", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(app.pay(1_000, "pm_card_visa", "automatic", true).await.status, 201);
    wait_for("the first payment's event", async || count().await >= 1).await;
    let before = count().await;
    let stream = app
        .state
        .nats
        .jetstream
        .get_stream(app.state.nats.psp_events_stream())
        .await
        .unwrap();
    for p in 0..app.state.config.nats.partitions {
        stream
            .delete_consumer(&format!("{}_psp_{p}", app.state.nats.prefix))
            .await
            .unwrap();
    }
    assert_eq!(app.pay(1_000, "pm_card_visa", "automatic", true).await.status, 201);
    wait_for(
        "the second payment's event, through a consumer made again",
        async || count().await > before,
    )
    .await;
}

/// An event parked again while its dead letter waits (the acknowledgement after the first
/// parking was lost) is one dead letter, not two; an unreadable one is always its own.
#[actix_web::test]
async fn an_event_parked_twice_is_one_dead_letter() {
    let app = spawn_app().await;
    let park = |deliveries: i32, envelope: Option<&'static [u8]>| {
        app.state.db.dead_letter(
            "sandbox",
            "evt_twice",
            "payment_intent.succeeded",
            "pi_x",
            "no payment with this PSP reference",
            deliveries,
            b"{}",
            envelope,
        )
    };
    park(5, Some(b"envelope")).await.unwrap();
    park(6, Some(b"envelope")).await.unwrap();
    let token = app.state.config.admin.token.clone();
    let listed = app
        .request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
        .await;
    assert_eq!(listed.body["total"], 1, "{}", listed.body);
    assert_eq!(listed.body["data"][0]["deliveries"], 6);
    park(5, None).await.unwrap();
    park(5, None).await.unwrap();
    let listed = app
        .request("GET", "/admin/v1/dead_letters", Some(&token), None, None)
        .await;
    assert_eq!(listed.body["total"], 3, "{}", listed.body);
}
