//! Risk controls before the PSP call: every action, lists taking effect at once, review
//! approved and rejected, the built-in card-testing rules, and predicate errors.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

async fn rule(app: &TestApp, action: &str, predicate: &str) -> Value {
    let r = app
        .post(
            "/api/v1/risk/rules",
            json!({ "action": action, "predicate": predicate }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

/// A block rule the API refuses: its status and error code.
async fn refused_rule(app: &TestApp, predicate: &str) -> (u16, Option<String>) {
    let r = app
        .post(
            "/api/v1/risk/rules",
            json!({ "action": "block", "predicate": predicate }),
        )
        .await;
    (r.status, r.body["error"]["code"].as_str().map(str::to_owned))
}

async fn pay(app: &TestApp, amount: i64, method: &str, capture: &str, customer: Value) -> Value {
    let r = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "ord_risk", "amount": { "value": amount, "currency": "USD" },
                    "payment_method": method, "capture_strategy": capture, "confirm": true,
                    "customer": customer }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn attempts(app: &TestApp, payment: &str) -> i64 {
    app.sql()
        .await
        .query_one("SELECT count(*) FROM psp_attempts WHERE payment_id = $1", &[&payment])
        .await
        .unwrap()
        .get(0)
}

/// A Luhn-valid test card number, distinct per `n`.
fn card_number(n: u64) -> String {
    // Away from the sandbox's own test numbers (4000000000000002 declines, …).
    let body = format!("400000{:09}", n + 100_000);
    let digits: Vec<u32> = body.chars().map(|c| c.to_digit(10).unwrap()).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 0 {
                (d * 2) % 9 + if d * 2 == 18 { 9 } else { 0 }
            } else {
                *d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

async fn tokenize(app: &TestApp, number: &str) -> String {
    let body = json!({ "card": { "number": number, "exp_month": 12, "exp_year": 2031, "cvc": "123" } }).to_string();
    let r = app
        .request("POST", "/sandbox/v1/payment_methods", Some(DEMO_KEY), None, Some(&body))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

#[actix_web::test]
async fn a_block_rule_fails_the_payment_without_a_psp_call() {
    let app = spawn_app().await;
    let r = rule(&app, "block", ":amount: > 100000 and :card_country: = 'US'").await;
    let id = r["rule_id"].as_str().unwrap();
    let p = pay(&app, 150_000, "pm_card_visa", "automatic", json!(null)).await;
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(p["failure"]["code"], "blocked");
    assert_eq!(
        (p["risk"]["outcome"].as_str(), p["risk"]["rule"].as_str()),
        (Some("block"), Some(id))
    );
    assert_eq!(
        attempts(&app, p["payment_id"].as_str().unwrap()).await,
        0,
        "the PSP never heard of it"
    );
    // Below the threshold the same card goes through, and the decision is still recorded.
    let ok = pay(&app, 90_000, "pm_card_visa", "automatic", json!(null)).await;
    assert_eq!(
        (ok["status"].as_str(), ok["risk"]["outcome"].as_str()),
        (Some("captured"), Some("allow"))
    );
    assert_eq!(ok["card"]["country"], "US");
    // Confirming later is assessed the same way.
    let later = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "o", "amount": { "value": 200_000, "currency": "USD" }, "payment_method": "pm_card_visa" }),
        )
        .await
        .body;
    let confirmed = app
        .post(
            &format!("/api/v1/payments/{}/confirm", later["payment_id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(
        (confirmed.status, confirmed.body["failure"]["code"].as_str()),
        (200, Some("blocked"))
    );
}

#[actix_web::test]
async fn request_3ds_makes_the_psp_challenge() {
    let app = spawn_app().await;
    rule(&app, "request_3ds", ":customer_country: != :card_country:").await;
    let p = pay(
        &app,
        5_000,
        "pm_card_visa",
        "manual",
        json!({ "country": "FR", "ip": "203.0.113.7" }),
    )
    .await;
    assert_eq!(p["status"], "requires_action", "{p}");
    assert_eq!(p["risk"]["outcome"], "request_3ds");
    let reference = p["psp_reference"].as_str().unwrap();
    let done = app.complete_3ds(reference).await;
    assert_eq!(
        (done.status, done.body["status"].as_str()),
        (200, Some("authorized")),
        "{}",
        done.body
    );
    // Same country: no challenge.
    let q = pay(&app, 5_000, "pm_card_visa", "manual", json!({ "country": "US" })).await;
    assert_eq!(q["status"], "authorized");
}

#[actix_web::test]
async fn review_holds_the_payment_until_approved_or_rejected_and_lists_apply_at_once() {
    let app = spawn_app().await;
    rule(&app, "review", ":email_domain: in @risky_domains").await;
    let add = app
        .post(
            "/api/v1/risk/lists/risky_domains/items",
            json!({ "item": "Risky.Example" }),
        )
        .await;
    assert_eq!((add.status, add.body["item"].as_str()), (201, Some("risky.example")));
    let customer = json!({ "email": "mallory@risky.example" });
    let p = pay(&app, 4_000, "pm_card_visa", "automatic", customer.clone()).await;
    assert_eq!(
        (p["status"].as_str(), p["amount_captured"].as_i64()),
        (Some("in_review"), Some(0)),
        "{p}"
    );
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let capture = app.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(capture.status, 409, "not capturable while in review");
    let approved = app.post(&format!("/api/v1/payments/{id}/approve"), json!({})).await;
    assert_eq!(
        (approved.status, approved.body["status"].as_str()),
        (200, Some("captured")),
        "approved with automatic capture: captured now: {}",
        approved.body
    );
    let q = pay(&app, 4_000, "pm_card_visa", "manual", customer.clone()).await;
    let qid = q["payment_id"].as_str().unwrap().to_owned();
    let rejected = app.post(&format!("/api/v1/payments/{qid}/reject"), json!({})).await;
    assert_eq!(
        (rejected.status, rejected.body["status"].as_str()),
        (200, Some("canceled"))
    );
    let again = app.post(&format!("/api/v1/payments/{qid}/approve"), json!({})).await;
    assert_eq!(again.status, 409);
    // Taking the domain off the list takes effect for the very next payment.
    let del = app
        .request(
            "DELETE",
            "/api/v1/risk/lists/risky_domains/items/risky.example",
            Some(DEMO_KEY),
            None,
            None,
        )
        .await;
    assert_eq!(del.status, 200);
    let r = pay(&app, 4_000, "pm_card_visa", "automatic", customer).await;
    assert_eq!(r["status"], "captured");
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

/// An email is read in one spelling: a domain's trailing dot is the same domain (the list
/// matches it), and an address with a space in it is refused rather than let past the list.
#[actix_web::test]
async fn an_email_domain_list_is_not_passed_by_another_spelling() {
    let app = spawn_app().await;
    rule(&app, "review", ":email_domain: in @risky_domains").await;
    let add = app
        .post(
            "/api/v1/risk/lists/risky_domains/items",
            json!({ "item": "risky.example" }),
        )
        .await;
    assert_eq!(add.status, 201, "{}", add.body);
    let p = pay(
        &app,
        4_000,
        "pm_card_visa",
        "manual",
        json!({ "email": "Mallory@Risky.Example." }),
    )
    .await;
    assert_eq!(p["status"], "in_review", "{p}");
    assert_eq!(p["customer"]["email"], "mallory@risky.example", "{p}");
    // An item written with the dot is the same domain.
    let add = app
        .post(
            "/api/v1/risk/lists/risky_domains/items",
            json!({ "item": "Other.Example." }),
        )
        .await;
    assert_eq!(
        (add.status, add.body["item"].as_str()),
        (201, Some("other.example")),
        "{}",
        add.body
    );
    let p = pay(
        &app,
        4_000,
        "pm_card_visa",
        "manual",
        json!({ "email": "eve@other.example" }),
    )
    .await;
    assert_eq!(p["status"], "in_review", "{p}");
    for email in [
        "mallory@risky.example ",
        "mallory@risky.example\t",
        "mal lory@risky.example",
    ] {
        let r = app
            .post(
                "/api/v1/payments",
                json!({ "order_id": "ord_risk", "amount": { "value": 4_000, "currency": "USD" },
                        "payment_method": "pm_card_visa", "confirm": true, "customer": { "email": email } }),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["param"].as_str()),
            (400, Some("customer.email")),
            "{email:?}: {}",
            r.body
        );
    }
}

/// A card number never reaches a rule or a list, however its digits are grouped: a rule's
/// numbers may be written with underscores, which its parser drops.
#[actix_web::test]
async fn a_card_number_is_refused_in_a_rule_or_a_list_item_however_grouped() {
    let app = spawn_app().await;
    for predicate in [":card_bin: = 4242_4242_4242_4242", ":card_bin: = '4242.4242.4242.4242'"] {
        assert_eq!(
            refused_rule(&app, predicate).await,
            (400, Some("card_data_not_allowed".into())),
            "{predicate}"
        );
    }
    let r = app
        .post(
            "/api/v1/risk/lists/cards/items",
            json!({ "item": "4242_4242_4242_4242" }),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let sql = app.sql().await;
    let stored: i64 = sql
        .query_one(
            "SELECT (SELECT count(*) FROM risk_rules WHERE predicate LIKE '%4242%')
                  + (SELECT count(*) FROM risk_list_items WHERE item LIKE '%4242%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
}

/// A payment a review rule holds whose card asks for 3-D Secure: once the customer finishes it,
/// the payment is held for review, not authorized; it is the merchant's approval that
/// authorizes (and, with automatic capture, captures) it.
#[actix_web::test]
async fn a_reviewed_payment_that_needed_3ds_stays_held_after_it() {
    let app = spawn_app().await;
    rule(&app, "review", ":amount: = 4321").await;
    let p = pay(&app, 4_321, "pm_card_threeDSecureRequired", "automatic", json!({})).await;
    assert_eq!(p["status"], "requires_action", "{p}");
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let reference = p["psp_reference"].as_str().unwrap().to_owned();
    let done = app.complete_3ds(&reference).await;
    assert_eq!(
        (done.status, done.body["status"].as_str()),
        (200, Some("in_review")),
        "{}",
        done.body
    );
    let capture = app.post(&format!("/api/v1/payments/{id}/capture"), json!({})).await;
    assert_eq!(capture.status, 409, "not capturable while in review: {}", capture.body);
    let approved = app.post(&format!("/api/v1/payments/{id}/approve"), json!({})).await;
    assert_eq!(
        (approved.status, approved.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        approved.body
    );
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn the_built_in_rules_stop_card_testing_from_one_ip_and_an_allow_rule_overrides_them() {
    let app = spawn_app().await;
    let ip = json!({ "ip": "198.51.100.9" });
    let mut outcomes = Vec::new();
    for n in 0..8 {
        let token = tokenize(&app, &card_number(n)).await;
        let p = pay(&app, 100, &token, "automatic", ip.clone()).await;
        outcomes.push(p["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(outcomes[..5], ["captured"; 5], "{outcomes:?}");
    assert_eq!(
        outcomes[5..],
        ["failed"; 3],
        "the sixth card from one IP is blocked: {outcomes:?}"
    );
    // Another IP is not affected.
    let other = pay(&app, 100, "pm_card_visa", "automatic", json!({ "ip": "192.0.2.1" })).await;
    assert_eq!(other["status"], "captured");
    // The merchant trusts this IP: allow wins over the built-in block.
    rule(&app, "allow", ":ip: in @trusted_ips").await;
    app.post(
        "/api/v1/risk/lists/trusted_ips/items",
        json!({ "item": "198.51.100.9" }),
    )
    .await;
    let token = tokenize(&app, &card_number(99)).await;
    let p = pay(&app, 100, &token, "automatic", ip).await;
    assert_eq!(p["status"], "captured", "{p}");
    let list = app.get("/api/v1/risk/rules").await.body;
    assert!(list["data"].as_array().unwrap().iter().any(|r| r["default"] == true));
}

#[actix_web::test]
async fn card_testing_from_the_addresses_of_one_ipv6_block_counts_as_one_ip() {
    let app = spawn_app().await;
    let mut outcomes = Vec::new();
    for n in 0..7 {
        let token = tokenize(&app, &card_number(n)).await;
        // A fresh address of the same /64 for each card, written in other forms too.
        let ip = if n % 2 == 0 {
            format!("2001:db8:7:7::{:x}", n + 1)
        } else {
            format!("2001:0DB8:0007:0007:0000:0000:0000:{:04x}", n + 1)
        };
        let p = pay(&app, 100, &token, "automatic", json!({ "ip": ip })).await;
        outcomes.push(p["status"].as_str().unwrap().to_owned());
        if n == 1 {
            // Stored in one form.
            assert_eq!(p["customer"]["ip"], "2001:db8:7:7::2", "{p}");
        }
    }
    assert_eq!(outcomes[..5], ["captured"; 5], "{outcomes:?}");
    assert_eq!(outcomes[5..], ["failed"; 2], "{outcomes:?}");
    // A list item that is an address is kept in the same form, so that it matches.
    rule(&app, "allow", ":ip: in @trusted_ips").await;
    let add = app
        .post(
            "/api/v1/risk/lists/trusted_ips/items",
            json!({ "item": "2001:0DB8:0007:0007:0000:0000:0000:0009" }),
        )
        .await;
    assert_eq!(add.body["item"], "2001:db8:7:7::9", "{}", add.body);
    let token = tokenize(&app, &card_number(50)).await;
    let p = pay(&app, 100, &token, "automatic", json!({ "ip": "2001:db8:7:7::9" })).await;
    assert_eq!(p["status"], "captured", "the trusted address is let through: {p}");
}

#[actix_web::test]
async fn an_ip_list_item_stored_in_another_form_still_matches() {
    let app = spawn_app().await;
    rule(&app, "block", ":ip: in @blocked_ips").await;
    let merchant = app.first_merchant().await.to_string();
    // As an item added before items were kept in one form.
    app.sql()
        .await
        .execute(
            "INSERT INTO risk_list_items (merchant_id, list, item) VALUES ($1, 'blocked_ips', '::ffff:203.0.113.77')",
            &[&merchant],
        )
        .await
        .unwrap();
    let p = pay(&app, 100, "pm_card_visa", "automatic", json!({ "ip": "203.0.113.77" })).await;
    assert_eq!(p["status"], "failed", "{p}");
}

#[actix_web::test]
async fn a_list_holds_at_most_its_bound_and_an_item_it_has_is_still_added_once() {
    let app = spawn_app().await;
    let merchant = app.first_merchant().await.to_string();
    let max = payrail::adapters::postgres::risk::MAX_LIST_ITEMS;
    app.sql()
        .await
        .execute(
            "INSERT INTO risk_list_items (merchant_id, list, item)
             SELECT $1, 'big', 'item' || n FROM generate_series(1, $2::bigint) n",
            &[&merchant, &max],
        )
        .await
        .unwrap();
    assert_eq!(add_to(&app, "big", "item1").await, 201, "an item it has: added once");
    let full = app
        .post("/api/v1/risk/lists/big/items", json!({ "item": "one_more" }))
        .await;
    assert_eq!(
        (full.status, full.body["error"]["code"].as_str()),
        (400, Some("list_full")),
        "{}",
        full.body
    );
    assert_eq!(app.count("risk_list_items").await, max);
    assert_eq!(add_to(&app, "small", "one_more").await, 201, "another list has room");
}

async fn add_to(app: &TestApp, list: &str, item: &str) -> u16 {
    app.post(&format!("/api/v1/risk/lists/{list}/items"), json!({ "item": item }))
        .await
        .status
}

#[actix_web::test]
async fn an_approval_that_landed_before_its_capture_began_goes_on_to_capture() {
    use sha2::Digest;
    let app = spawn_app().await;
    rule(&app, "review", ":amount: = 4321").await;
    let p = pay(
        &app,
        4_321,
        "pm_card_visa",
        "automatic",
        json!({ "email": "a@example.com" }),
    )
    .await;
    assert_eq!(p["status"], "in_review", "{p}");
    let (id, merchant) = (p["payment_id"].as_str().unwrap(), p["merchant_id"].as_str().unwrap());
    // The approval's first request (key K) committed the approval and stopped before its
    // capture began: the row is authorized, a version on, and K's claim has no answer and a
    // lease that ran out.
    let path = format!("/api/v1/payments/{id}/approve");
    let db = app.sql().await;
    let moved = db
        .execute(
            "UPDATE payments SET status = 'authorized', version = version + 1 WHERE id = $1 AND status = 'in_review'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(moved, 1);
    // Another request's approval meanwhile is refused: it did not approve this payment (its
    // own commit loses the race on the version and nothing of it lands).
    let other = app.post(&path, json!({})).await;
    assert_eq!(other.status, 409, "{}", other.body);
    assert_eq!(
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"],
        "authorized"
    );
    let key = hex::encode(sha2::Sha256::digest(b"approve-once"));
    let fingerprint = payrail::api::idempotency::fingerprint("POST", &path, b"{}").to_vec();
    db.execute(
        "INSERT INTO idempotency_keys (merchant_id, key, fingerprint, locked_until) VALUES ($1, $2, $3, now() - interval '1 second')",
        &[&merchant, &key, &fingerprint],
    )
    .await
    .unwrap();
    // K's retry takes the key over and resumes: the capture the approval promised.
    let approved = app
        .request("POST", &path, Some(DEMO_KEY), Some("approve-once"), Some("{}"))
        .await;
    assert_eq!(
        (approved.status, approved.body["status"].as_str()),
        (200, Some("captured")),
        "{}",
        approved.body
    );
    // Another key's approval is refused: the payment is no longer in review.
    let again = app.post(&path, json!({})).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(app.state.db.verify_ledger().await.unwrap().is_clean());
}

#[actix_web::test]
async fn bad_predicates_are_refused_with_their_position() {
    let app = spawn_app_with(|_| {}).await;
    let r = app
        .post(
            "/api/v1/risk/rules",
            json!({ "action": "block", "predicate": ":amount: > " }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("predicate_invalid"))
    );
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("position 11"),
        "{}",
        r.body
    );
    // A rule that could never hold (text against a number; a text attribute as a yes-or-no)
    // is refused, not stored to block nothing.
    for predicate in [":card_bin: = 424242", "not :email:"] {
        assert_eq!(
            refused_rule(&app, predicate).await,
            (400, Some("predicate_invalid".into())),
            "{predicate}"
        );
    }
    let r = app
        .post(
            "/api/v1/risk/rules",
            json!({ "action": "block", "predicate": ":amount: > 5 and :shoe_size: > 40" }),
        )
        .await;
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(":shoe_size: at position 17"),
        "{}",
        r.body
    );
    let r = app
        .post(
            "/api/v1/risk/rules",
            json!({ "action": "explode", "predicate": ":amount: > 5" }),
        )
        .await;
    assert_eq!(r.status, 400);
    // A rule made twice with one key is one rule.
    let body = json!({ "action": "review", "predicate": ":amount: > 5" }).to_string();
    for _ in 0..2 {
        let r = app
            .request(
                "POST",
                "/api/v1/risk/rules",
                Some(DEMO_KEY),
                Some("rule-1"),
                Some(&body),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let mine: Vec<Value> = app.get("/api/v1/risk/rules").await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["default"] == false)
        .cloned()
        .collect();
    assert_eq!(mine.len(), 1);
    let id = mine[0]["rule_id"].as_str().unwrap();
    for _ in 0..2 {
        let r = app
            .request(
                "DELETE",
                &format!("/api/v1/risk/rules/{id}"),
                Some(DEMO_KEY),
                None,
                None,
            )
            .await;
        assert_eq!(r.status, 200);
    }
}

/// Velocity survives a restart: a new engine on the same database counts the last day again.
#[actix_web::test]
async fn velocity_is_rebuilt_from_the_last_day_after_a_restart() {
    let app = spawn_app().await;
    let ip = json!({ "ip": "198.51.100.77", "email": "t@tester.example" });
    for n in 0..3 {
        let token = tokenize(&app, &card_number(500 + n)).await;
        pay(&app, 100, &token, "automatic", ip.clone()).await;
    }
    let fresh = payrail::actors::risk::RiskEngine::new(app.state.db.clone(), true);
    assert_eq!(fresh.rebuild().await.unwrap(), 3);
    let now = chrono::Utc::now().timestamp_millis() + 1;
    let w = fresh.velocity.window("ip:198.51.100.77", now, 3_600_000);
    assert_eq!((w.attempts, w.cards, w.amount), (3, 3, 300));
    assert_eq!(
        fresh
            .velocity
            .window("email:t@tester.example", now, 86_400_000)
            .attempts,
        3
    );
    // Made two hours ago and changed since (captured, settled): attempts of the last day, not
    // of the last hour.
    app.sql()
        .await
        .execute(
            "UPDATE payments SET created_at = created_at - interval '2 hours', updated_at = now()",
            &[],
        )
        .await
        .unwrap();
    let later = payrail::actors::risk::RiskEngine::new(app.state.db.clone(), true);
    assert_eq!(later.rebuild().await.unwrap(), 3);
    let hour = later.velocity.window("ip:198.51.100.77", now, 3_600_000);
    let day = later.velocity.window("ip:198.51.100.77", now, 86_400_000);
    assert_eq!((hour.attempts, day.attempts), (0, 3));
}

#[actix_web::test]
async fn concurrent_rule_creations_never_pass_the_bound() {
    let app = spawn_app().await;
    let merchant = app.first_merchant().await;
    let db = app.sql().await;
    let have: i64 = db
        .query_one(
            "SELECT count(*) FROM risk_rules WHERE merchant_id = $1",
            &[&merchant.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        "INSERT INTO risk_rules (id, merchant_id, action, predicate)
         SELECT 'rr_seed_' || i, $1, 'review', ':amount: > 99999999998' FROM generate_series(1, $2::int) i",
        &[&merchant.as_str(), &(190 - have as i32)],
    )
    .await
    .unwrap();
    let made = futures_util::future::join_all((0..30).map(|i| {
        let app = &app;
        async move {
            let body = json!({ "action": "block", "predicate": format!(":amount: > {}", 1_000_000 + i) }).to_string();
            let key = format!("rule-{i}");
            app.request("POST", "/api/v1/risk/rules", Some(DEMO_KEY), Some(&key), Some(&body))
                .await
                .status
        }
    }))
    .await;
    assert_eq!(made.iter().filter(|s| **s == 201).count(), 10, "{made:?}");
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM risk_rules WHERE merchant_id = $1",
            &[&merchant.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 200, "a rule past the bound is neither listed nor evaluated");
}
