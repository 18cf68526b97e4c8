//! The Stripe connector against localstripe (a fake, stateful Stripe server, started here
//! through `scripts/localstripe/run.sh`, which makes its venv on first use): a full lifecycle
//! with a partial capture and two partial refunds, a cancel, a decline, and localstripe's
//! webhooks delivered to the connector's own URL.
//!
//! What localstripe does not do, and how it is covered instead:
//! - it ignores `Idempotency-Key` (a repeated call is a new call there): the keys payrail sends
//!   are checked by the recorded-request test in `src/adapters/psp/stripe.rs`, and retries are
//!   not exercised against it;
//! - its declines carry no `decline_code`, and it sends no `charge.refunded` or
//!   `charge.dispute.*` events: Stripe's recorded answers cover the decline codes
//!   (`src/adapters/psp/stripe.rs` tests), and Stripe's recorded `charge.refunded`,
//!   `charge.dispute.created` and `charge.dispute.closed` are sent to the connector below;
//! - a partial capture is a capture of all and a refund of the rest there, and its intents have
//!   no `amount_received`: payrail reads the amount it asked for.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::events::wait_for;
use crate::helpers::{free_port, spawn_app_with, TestApp};

const KEY: &str = "1f2e3d4c5b6a79880f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";
const WEBHOOK_SECRET: &str = "whsec_localstripe_test";

struct LocalStripe {
    child: Child,
    base: String,
    http: awc::Client,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LocalStripe {
    async fn start() -> LocalStripe {
        let port = free_port();
        let root = env!("CARGO_MANIFEST_DIR");
        let child = Command::new(format!("{root}/scripts/localstripe/run.sh"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("scripts/localstripe/run.sh");
        let s = LocalStripe {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: awc::Client::builder().timeout(Duration::from_secs(10)).finish(),
        };
        // The first start makes its venv (a package download): allow for it.
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok(r) = s
                .http
                .get(format!("{}/v1/customers", s.base))
                .basic_auth("sk_test_payrail", "")
                .send()
                .await
            {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "localstripe did not start");
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        s
    }

    async fn form(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth("sk_test_payrail", "")
            .send_form(&form)
            .await
            .unwrap();
        let body = r.body().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        let mut r = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth("sk_test_payrail", "")
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&r.body().await.unwrap()).unwrap()
    }

    /// A card payment method at localstripe (payrail never sees the number).
    async fn card(&self, number: &str) -> String {
        let pm = self
            .form(
                "/v1/payment_methods",
                &[
                    ("type", "card"),
                    ("card[number]", number),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2030"),
                    ("card[cvc]", "123"),
                ],
            )
            .await;
        pm["id"].as_str().unwrap().to_owned()
    }
}

/// payrail with a Stripe connector on localstripe as the demo merchant's only route, and
/// localstripe's webhooks pointed at the connector's own URL.
async fn setup() -> (TestApp, LocalStripe, String) {
    let stripe = LocalStripe::start().await;
    let app = spawn_app_with(|c| {
        c.secrets.key = KEY.into();
        c.psp.timeout_ms = 5_000;
    })
    .await;
    let conns = app.get("/api/v1/connectors").await;
    let merchant = conns.body["data"][0]["merchant_id"].as_str().unwrap().to_owned();
    let token = app.state.config.admin.token.clone();
    let body = json!({ "connector_id": "mca_stripe_local", "psp": "stripe", "label": "Stripe (localstripe)",
                       "credentials": { "api_key": "sk_test_payrail", "webhook_secret": WEBHOOK_SECRET,
                                        "api_base": stripe.base } });
    let r = app
        .request(
            "POST",
            &format!("/admin/v1/merchants/{merchant}/connectors"),
            Some(&token),
            None,
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        !r.raw.windows(15).any(|w| w == b"sk_test_payrail"),
        "the key is never returned"
    );
    let rules = json!({ "default": ["mca_stripe_local"] });
    let r = app
        .request(
            "PUT",
            &format!("/admin/v1/merchants/{merchant}/routing"),
            Some(&token),
            None,
            Some(&rules.to_string()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let hook = json!({ "url": format!("{}/internal/webhooks/psp/stripe/mca_stripe_local", app.address),
                       "secret": WEBHOOK_SECRET,
                       "events": ["payment_intent.succeeded", "payment_intent.payment_failed"] });
    let mut r = stripe
        .http
        .post(format!("{}/_config/webhooks/payrail", stripe.base))
        .basic_auth("sk_test_payrail", "")
        .send_json(&hook)
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.body().await);
    (app, stripe, merchant)
}

async fn pay(app: &TestApp, amount: i64, pm: &str, capture: &str) -> Value {
    let r = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "ord_stripe", "amount": { "value": amount, "currency": "EUR" },
                    "payment_method": pm, "capture_strategy": capture, "confirm": true }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn processed_stripe_events(app: &TestApp, reference: &str) -> Vec<String> {
    app.sql()
        .await
        .query(
            "SELECT e.event_type FROM processed_events e JOIN payments p ON p.id = e.payment_id
             WHERE e.provider = 'stripe' AND p.psp_reference = $1 ORDER BY e.event_type",
            &[&reference],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[actix_web::test]
async fn a_stripe_payment_lives_its_whole_life_on_localstripe() {
    let (app, stripe, _) = setup().await;
    let visa = stripe.card("4242424242424242").await;

    // Authorize (manual capture), capture part of it, refund twice.
    let p = pay(&app, 5_000, &visa, "manual").await;
    assert_eq!(
        (
            p["status"].as_str(),
            p["psp"].as_str(),
            p["routing"]["connector_id"].as_str()
        ),
        (Some("authorized"), Some("stripe"), Some("mca_stripe_local")),
        "{p}"
    );
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let pi = p["psp_reference"].as_str().unwrap().to_owned();
    assert!(pi.starts_with("pi_"), "{pi}");
    let at_stripe = stripe.get(&format!("/v1/payment_intents/{pi}")).await;
    assert_eq!(
        (
            at_stripe["status"].as_str(),
            at_stripe["amount"].as_i64(),
            at_stripe["currency"].as_str()
        ),
        (Some("requires_capture"), Some(5_000), Some("eur"))
    );
    assert_eq!(at_stripe["metadata"]["payrail_payment_id"], id.as_str());

    let r = app
        .post(
            &format!("/api/v1/payments/{id}/capture"),
            json!({ "amount": { "value": 4_000, "currency": "EUR" } }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str(), r.body["amount_captured"].as_i64()),
        (200, Some("captured"), Some(4_000)),
        "{}",
        r.body
    );
    assert_eq!(
        stripe.get(&format!("/v1/payment_intents/{pi}")).await["status"],
        "succeeded"
    );

    for amount in [1_000, 1_500] {
        let r = app
            .post(
                &format!("/api/v1/payments/{id}/refunds"),
                json!({ "amount": { "value": amount, "currency": "EUR" } }),
            )
            .await;
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (201, Some("succeeded")),
            "{}",
            r.body
        );
        assert!(r.body["psp_reference"].as_str().unwrap().starts_with("re_"));
    }
    let p = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(
        (p["amount_refunded"].as_i64(), p["status"].as_str()),
        (Some(2_500), Some("captured")),
        "{p}"
    );
    let refunds = stripe.get(&format!("/v1/payment_intents/{pi}")).await["latest_charge"]["refunds"].clone();
    let mut amounts: Vec<i64> = refunds["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["amount"].as_i64().unwrap())
        .collect();
    amounts.sort();
    // localstripe refunds the uncaptured 1,000 itself at the partial capture.
    assert_eq!(amounts, [1_000, 1_000, 1_500], "{refunds}");

    // The journals balance and every call carried the connector.
    let att: Vec<(String, String)> = app
        .sql()
        .await
        .query(
            "SELECT operation, outcome FROM psp_attempts WHERE payment_id = $1 AND connector_id = 'mca_stripe_local' ORDER BY started_at",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ops: Vec<&str> = att.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["authorize", "capture", "refund", "refund"]);
    assert!(att.iter().all(|(_, o)| o == "succeeded"));

    // Automatic capture: localstripe's payment_intent.succeeded reaches the connector's URL,
    // is verified with its own secret, and is applied (a no-op: already captured).
    let p = pay(&app, 2_000, &visa, "automatic").await;
    assert_eq!(p["status"], "captured", "{p}");
    let pi = p["psp_reference"].as_str().unwrap().to_owned();
    wait_for("localstripe's payment_intent.succeeded", async || {
        processed_stripe_events(&app, &pi).await == ["payment_intent.succeeded"]
    })
    .await;
    assert_eq!(
        app.get(&format!("/api/v1/payments/{}", p["payment_id"].as_str().unwrap()))
            .await
            .body["status"],
        "captured"
    );

    // Cancel an authorization.
    let p = pay(&app, 3_000, &visa, "manual").await;
    let r = app
        .post(
            &format!("/api/v1/payments/{}/cancel", p["payment_id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        r.body
    );
    let pi = p["psp_reference"].as_str().unwrap();
    assert_eq!(
        stripe.get(&format!("/v1/payment_intents/{pi}")).await["status"],
        "canceled"
    );

    // A decline is the payment's answer, with the intent it failed; its webhook changes nothing.
    // (localstripe declines 4000 0000 0000 0002 only when it is attached to a customer; 0341
    // is Stripe's card that attaches and then fails every charge.)
    let declined = stripe.card("4000000000000341").await;
    let p = pay(&app, 1_200, &declined, "automatic").await;
    assert_eq!(
        (p["status"].as_str(), p["failure"]["code"].as_str()),
        (Some("failed"), Some("card_declined")),
        "{p}"
    );
    let pi = p["psp_reference"].as_str().unwrap().to_owned();
    assert!(pi.starts_with("pi_"));
    wait_for("localstripe's payment_intent.payment_failed", async || {
        processed_stripe_events(&app, &pi).await == ["payment_intent.payment_failed"]
    })
    .await;

    let r = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
            "ledger",
            "verify",
        ])
        .env("PAYRAIL__DATABASE__URL", &app.database_url)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
}

#[actix_web::test]
async fn stripe_unreachable_fails_over_and_stripes_recorded_refund_and_dispute_events_apply() {
    let (app, stripe, merchant) = setup().await;
    let visa = stripe.card("4242424242424242").await;
    // A second Stripe connector whose API cannot be reached (nothing listens there): payments
    // routed to it first go to localstripe, with the unreachable attempt on record.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let token = app.state.config.admin.token.clone();
    let body = json!({ "connector_id": "mca_stripe_dead", "psp": "stripe", "label": "down",
                       "credentials": { "api_key": "sk_test_dead", "api_base": dead } });
    let r = app
        .request(
            "POST",
            &format!("/admin/v1/merchants/{merchant}/connectors"),
            Some(&token),
            None,
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rules = json!({ "default": ["mca_stripe_dead", "mca_stripe_local"] });
    let r = app
        .request(
            "PUT",
            &format!("/admin/v1/merchants/{merchant}/routing"),
            Some(&token),
            None,
            Some(&rules.to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
    let p = pay(&app, 4_200, &visa, "automatic").await;
    assert_eq!(
        (p["status"].as_str(), p["routing"]["connector_id"].as_str()),
        (Some("captured"), Some("mca_stripe_local")),
        "{p}"
    );
    assert_eq!(p["attempts"][0]["connector_id"], "mca_stripe_dead");
    assert_eq!(p["attempts"][0]["outcome"], "unreachable");

    // Stripe's events that localstripe never sends, in Stripe's recorded shapes, signed with the
    // connector's secret and sent to its URL. First `charge.refunded` for a refund localstripe
    // already answered `succeeded`: recorded once, and it changes nothing.
    let id = p["payment_id"].as_str().unwrap();
    let pi = p["psp_reference"].as_str().unwrap();
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": 700, "currency": "EUR" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let re = r.body["psp_reference"].as_str().unwrap().to_owned();
    let event = json!({
        "id": "evt_1QrecordedChargeRefunded", "object": "event", "api_version": "2024-06-20",
        "type": "charge.refunded", "created": 1764201600, "livemode": false,
        "data": { "object": {
            "id": "ch_3QrecordedCharge", "object": "charge", "amount": 4200, "amount_captured": 4200,
            "amount_refunded": 700, "currency": "eur", "captured": true, "paid": true, "refunded": false,
            "payment_intent": pi, "status": "succeeded",
            "refunds": { "object": "list", "has_more": false, "total_count": 1,
                         "data": [ { "id": re, "object": "refund", "amount": 700, "currency": "eur",
                                     "payment_intent": pi, "status": "succeeded" } ] } } }
    })
    .to_string();
    let t = chrono::Utc::now().timestamp();
    let sig = payrail::adapters::psp::signature::sign_stripe(event.as_bytes(), WEBHOOK_SECRET, t);
    let status = app
        .client
        .post(format!("{}/internal/webhooks/psp/stripe/mca_stripe_local", app.address))
        .insert_header(("Stripe-Signature", sig))
        .insert_header(("Content-Type", "application/json"))
        .send_body(event)
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);
    wait_for("the recorded charge.refunded to be applied", async || {
        app.sql()
            .await
            .query_opt(
                "SELECT 1 FROM processed_events WHERE event_id = 'evt_1QrecordedChargeRefunded'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let p = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(p["amount_refunded"], 700, "{p}");

    // Then a dispute: `charge.dispute.created` opens it, `charge.dispute.closed` (won) closes it.
    let send = |event: Value| {
        let app = &app;
        async move {
            let body = event.to_string();
            let sig = payrail::adapters::psp::signature::sign_stripe(
                body.as_bytes(),
                WEBHOOK_SECRET,
                chrono::Utc::now().timestamp(),
            );
            let status = app
                .client
                .post(format!("{}/internal/webhooks/psp/stripe/mca_stripe_local", app.address))
                .insert_header(("Stripe-Signature", sig))
                .insert_header(("Content-Type", "application/json"))
                .send_body(body)
                .await
                .unwrap()
                .status()
                .as_u16();
            assert_eq!(status, 200);
        }
    };
    send(
        json!({ "id": "evt_1QrecordedDisputeCreated", "object": "event", "type": "charge.dispute.created",
                 "created": 1764201700, "livemode": false,
                 "data": { "object": { "id": "du_1QrecordedDispute", "object": "dispute", "amount": 3500,
                                       "currency": "eur", "charge": "ch_3QrecordedCharge", "payment_intent": pi,
                                       "reason": "fraudulent", "status": "needs_response" } } }),
    )
    .await;
    wait_for("the dispute to open", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == "chargeback_open"
    })
    .await;
    let disputes = app.get("/api/v1/disputes").await.body;
    let d = &disputes["data"][0];
    assert_eq!(
        (d["amount"]["value"].as_i64(), d["reason"].as_str()),
        (Some(3_500), Some("fraudulent")),
        "{disputes}"
    );
    send(
        json!({ "id": "evt_1QrecordedDisputeClosed", "object": "event", "type": "charge.dispute.closed",
                 "created": 1764201800, "livemode": false,
                 "data": { "object": { "id": "du_1QrecordedDispute", "object": "dispute", "amount": 3500,
                                       "currency": "eur", "payment_intent": pi, "status": "won" } } }),
    )
    .await;
    wait_for("the dispute to be won", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == "settled"
    })
    .await;
}
