//! Invariant 8: no card number in a log line, a response, or the database, after a full
//! lifecycle with every test card, tokenized from its raw number.

use serde_json::json;

use crate::helpers::{captured_logs, spawn_app, DEMO_KEY};

const PANS: &[&str] = &[
    "4242424242424242",
    "5555555555554444",
    "4000000000000002",
    "4000000000009995",
    "4000000000003220",
    "4000000000000259",
    "4100000000000019",
];

fn spaced(pan: &str) -> String {
    pan.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

#[actix_web::test]
async fn no_card_number_reaches_logs_responses_or_storage() {
    let app = spawn_app().await;
    let mut responses = Vec::new();
    for pan in PANS {
        // The way a browser SDK would send it: spaced, as typed.
        let body =
            json!({ "card": { "number": spaced(pan), "exp_month": 11, "exp_year": 2031, "cvc": "314" } }).to_string();
        let r = app
            .request("POST", "/sandbox/v1/payment_methods", Some(DEMO_KEY), None, Some(&body))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let token = r.body["id"].as_str().unwrap().to_owned();
        responses.push(r.raw);
        for capture in ["manual", "automatic"] {
            let r = app.pay(2000, &token, capture, true).await;
            let p = r.body["payment_id"].as_str().unwrap().to_owned();
            responses.push(r.raw);
            for path in ["capture", "refunds", "cancel"] {
                responses.push(app.post(&format!("/api/v1/payments/{p}/{path}"), json!({})).await.raw);
            }
            if let Some(reference) = app.get(&format!("/api/v1/payments/{p}")).await.body["psp_reference"].as_str() {
                responses.push(app.complete_3ds(reference).await.raw);
            }
            responses.push(app.get(&format!("/api/v1/payments/{p}/events")).await.raw);
            responses.push(app.get(&format!("/api/v1/ledger/journals?payment_id={p}")).await.raw);
        }
        // A card number used as an Idempotency-Key by mistake: only its digest is kept.
        let p = app.pay(100, "pm_card_visa", "manual", true).await.body["payment_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/api/v1/payments/{p}/capture");
        let r = app.request("POST", &path, Some(DEMO_KEY), Some(pan), Some("{}")).await;
        assert_eq!(r.status, 200);
        responses.push(r.raw);
        // A raw number where a token belongs is refused without being repeated.
        let body =
            json!({ "order_id": "o", "amount": { "value": 1, "currency": "USD" }, "payment_method": pan }).to_string();
        responses.push(
            app.request(
                "POST",
                "/api/v1/payments",
                Some(DEMO_KEY),
                Some("raw-card"),
                Some(&body),
            )
            .await
            .raw,
        );
    }
    responses.push(app.get("/api/v1/payments?limit=100").await.raw);

    let db = app.sql().await;
    let tables: Vec<String> = db
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut stored = String::new();
    for t in &tables {
        for row in db.query(&format!("SELECT t::text FROM {t} t"), &[]).await.unwrap() {
            stored.push_str(row.get::<_, &str>(0));
        }
    }
    assert!(stored.contains("pm_"), "the scan reads the tables");
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("payment_actor"), "the scan reads the logs");
    for pan in PANS {
        for form in [pan.to_string(), spaced(pan)] {
            assert!(!logs.contains(&form), "a log line holds {form}");
            assert!(!stored.contains(&form), "the database holds {form}");
            for r in &responses {
                assert!(!String::from_utf8_lossy(r).contains(&form), "a response holds {form}");
            }
        }
    }
}

/// A handler's log lines, and its payment actor's, carry the request id of the request.
#[actix_web::test]
async fn handler_and_actor_log_lines_carry_the_request_id() {
    let app = spawn_app().await;
    let body = json!({ "order_id": "ord_log", "amount": { "value": 700, "currency": "USD" },
                       "payment_method": "pm_card_visa", "confirm": true })
    .to_string();
    let r = app
        .client
        .post(format!("{}/api/v1/payments", app.address))
        .insert_header(("Authorization", format!("Bearer {DEMO_KEY}")))
        .insert_header(("Idempotency-Key", "log-1"))
        .insert_header(("Request-Id", "req_logcheck_7f3a"))
        .insert_header(("Content-Type", "application/json"))
        .send_body(body)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    let ours: Vec<&str> = logs.lines().filter(|l| l.contains("req_logcheck_7f3a")).collect();
    assert!(
        ours.iter()
            .any(|l| l.contains("payment_actor") && l.contains("payment message handled")),
        "the actor's line carries the request id: {ours:#?}"
    );
    assert!(
        ours.iter()
            .any(|l| l.contains("idempotency key") && l.contains("verdict=\"first commit\"")),
        "the handler's line carries it: {ours:#?}"
    );
    assert!(
        ours.iter().any(|l| l.contains("status=201")),
        "the request's own line too: {ours:#?}"
    );
}
