//! Marketplaces: a platform's connected accounts, and split payments whose captures, refunds
//! and disputes move each seller's money in the ledger.

use serde_json::{json, Value};

use crate::events::{send_event, wait_for, wait_for_event_outcome};
use crate::helpers::{spawn_app, spawn_app_with, TestApp, DEMO_KEY};

async fn account(app: &TestApp, name: &str) -> String {
    let r = app
        .post(
            "/api/v1/accounts",
            json!({ "name": name, "country": "FR", "default_currency": "USD", "email": "seller@example.com" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// A seller paid out only when asked, its funds available on the day they are captured.
async fn manual_account(app: &TestApp) -> String {
    let r = app
        .post(
            "/api/v1/accounts",
            json!({ "name": "A", "country": "FR", "default_currency": "USD",
                    "payout_schedule": { "delay_days": 0, "interval": "manual" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// (pending, available) of a seller in USD.
async fn seller(app: &TestApp, acct: &str) -> (i64, i64) {
    let b = app.get(&format!("/api/v1/accounts/{acct}/balance")).await;
    assert_eq!(b.status, 200, "{}", b.body);
    let pick = |side: &str| {
        b.body[side]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["currency"] == "USD")
            .map(|x| x["amount"].as_i64().unwrap())
            .unwrap_or(0)
    };
    (pick("pending"), pick("available"))
}

/// A seller made with `account` (the create request's body), paid `share` of a captured split
/// payment of `amount`, its funds released.
async fn funded_seller(app: &TestApp, account: Value, amount: i64, share: i64) -> String {
    let r = app.post("/api/v1/accounts", account).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let a = r.body["id"].as_str().unwrap().to_owned();
    split_payment(
        app,
        amount,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": share }] }),
    )
    .await;
    app.state.db.release_seller_funds(100).await.unwrap();
    a
}

async fn platform_payable(app: &TestApp) -> i64 {
    let b = app.get("/api/v1/balance").await.body;
    b["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["currency"] == "USD")
        .map(|x| x["payable"].as_i64().unwrap())
        .unwrap_or(0)
}

async fn split_payment(app: &TestApp, amount: i64, capture: &str, method: &str, body: Value) -> Value {
    let mut req = json!({ "order_id": "ord_split", "amount": { "value": amount, "currency": "USD" },
                          "payment_method": method, "capture_strategy": capture, "confirm": true });
    for (k, v) in body.as_object().unwrap() {
        req[k] = v.clone();
    }
    let r = app.post("/api/v1/payments", req).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn refund(app: &TestApp, id: &str, body: Value) -> Value {
    let r = app.post(&format!("/api/v1/payments/{id}/refunds"), body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn assert_ledger_clean(app: &TestApp) {
    let report = app.state.db.verify_ledger().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[actix_web::test]
async fn a_platform_creates_reads_lists_and_updates_its_accounts_and_no_one_elses() {
    let app = spawn_app().await;
    let body = json!({ "name": "Ana's Pottery", "country": "PT", "default_currency": "USD",
                       "payout_schedule": { "interval": "weekly", "delay_days": 7, "minimum": 5000 },
                       "metadata": { "seller_ref": "s-1" } })
    .to_string();
    let first = app
        .request(
            "POST",
            "/api/v1/accounts",
            Some(DEMO_KEY),
            Some("acct-key-1"),
            Some(&body),
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let id = first.body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("acct_"));
    assert_eq!(first.body["status"], "active");
    assert_eq!(
        first.body["payout_schedule"],
        json!({ "interval": "weekly", "delay_days": 7, "minimum": 5000 })
    );
    // The same key again: the same account, not a second one.
    let again = app
        .request(
            "POST",
            "/api/v1/accounts",
            Some(DEMO_KEY),
            Some("acct-key-1"),
            Some(&body),
        )
        .await;
    assert_eq!((again.status, again.body["id"].as_str()), (201, Some(id.as_str())));
    assert_eq!(app.count("connected_accounts").await, 1);

    let others: Vec<String> = vec![account(&app, "B").await, account(&app, "C").await];
    let page = app.get("/api/v1/accounts?limit=2").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let ids: Vec<&str> = page.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![others[1].as_str(), others[0].as_str()]);
    assert_eq!(page.body["has_more"], true);
    let rest = app
        .get(&format!("/api/v1/accounts?limit=2&starting_after={}", others[0]))
        .await;
    assert_eq!(rest.body["data"][0]["id"], id.as_str());
    assert_eq!(rest.body["has_more"], false);

    let updated = app
        .post(
            &format!("/api/v1/accounts/{id}"),
            json!({ "status": "restricted", "payout_schedule": { "minimum": 0 } }),
        )
        .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["status"], "restricted");
    assert_eq!(updated.body["payout_schedule"]["interval"], "weekly");
    assert_eq!(updated.body["payout_schedule"]["minimum"], 0);
    assert_eq!(
        app.get(&format!("/api/v1/accounts/{id}")).await.body["status"],
        "restricted"
    );
    // Each change is an event.
    let db = app.sql().await;
    let kinds: Vec<String> = db
        .query(
            "SELECT event_type FROM outbox WHERE event_type LIKE 'account.%' AND body->>'id' = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["account.created", "account.updated"]);

    // Another platform sees none of them.
    let other = app.new_merchant().await;
    for (method, path) in [
        ("GET", format!("/api/v1/accounts/{id}")),
        ("GET", format!("/api/v1/accounts/{id}/balance")),
    ] {
        let r = app.request(method, &path, Some(&other), None, None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    let r = app
        .request(
            "POST",
            &format!("/api/v1/accounts/{id}"),
            Some(&other),
            Some("k-other"),
            Some(r#"{"status":"disabled"}"#),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let listed = app.request("GET", "/api/v1/accounts", Some(&other), None, None).await;
    assert_eq!(listed.body["data"], json!([]));

    for (bad, param) in [
        (
            json!({ "name": "x", "country": "pt", "default_currency": "USD" }),
            "country",
        ),
        (
            json!({ "name": "x", "country": "PT", "default_currency": "XYZ" }),
            "default_currency",
        ),
        (
            json!({ "name": "x", "country": "PT", "default_currency": "USD", "status": "gone" }),
            "status",
        ),
        (
            json!({ "name": "x", "country": "PT", "default_currency": "USD", "payout_schedule": { "delay_days": 31 } }),
            "payout_schedule.delay_days",
        ),
    ] {
        let r = app.post("/api/v1/accounts", bad).await;
        assert_eq!(
            (r.status, r.body["error"]["param"].as_str()),
            (400, Some(param)),
            "{}",
            r.body
        );
    }
}

#[actix_web::test]
async fn a_capture_credits_each_seller_and_the_platform_its_share() {
    let app = spawn_app().await;
    let (a, b) = (account(&app, "A").await, account(&app, "B").await);
    let p = split_payment(
        &app,
        10_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 6_000 }, { "account": b, "amount": 2_500 }],
                "application_fee_amount": 1_000 }),
    )
    .await;
    assert_eq!(p["status"], "captured", "{p}");
    assert_eq!(p["application_fee_amount"], 1_000);
    assert_eq!(p["splits"][0]["amount_captured"], 6_000);
    assert_eq!(p["splits"][1]["amount_captured"], 2_500);
    assert_eq!(seller(&app, &a).await, (6_000, 0));
    assert_eq!(seller(&app, &b).await, (2_500, 0));
    // The platform: its fee and the unsplit 500, less payrail's fee (2.9 % + 30 = 320).
    assert_eq!(platform_payable(&app).await, 1_500 - 320);
    // The capture journal: every entry, once.
    let db = app.sql().await;
    let id = p["payment_id"].as_str().unwrap();
    let rows = db
        .query(
            "SELECT e.account, e.debit, e.credit FROM entries e JOIN journals j ON j.id = e.journal_id
             WHERE j.payment_id = $1 ORDER BY e.account",
            &[&id],
        )
        .await
        .unwrap();
    let entries: Vec<(String, i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let mut expected = vec![
        (
            format!("merchant_payable:{}", p["merchant_id"].as_str().unwrap()),
            0,
            1_180,
        ),
        ("platform_fee_revenue".to_owned(), 0, 320),
        ("psp_clearing".to_owned(), 10_000, 0),
        (format!("seller_pending:{a}"), 0, 6_000),
        (format!("seller_pending:{b}"), 0, 2_500),
    ];
    expected.sort();
    assert_eq!(entries, expected);
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_partial_capture_shares_pro_rata_and_refunds_take_back_from_the_sellers() {
    let app = spawn_app().await;
    let (a, b, c) = (
        account(&app, "A").await,
        account(&app, "B").await,
        account(&app, "C").await,
    );
    let p = split_payment(
        &app,
        3_000,
        "manual",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 1_000 }, { "account": b, "amount": 1_000 },
                           { "account": c, "amount": 1_000 }] }),
    )
    .await;
    let id = p["payment_id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/capture"),
            json!({ "amount": { "value": 1_001, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // 333.67 each: the unit left over goes to the largest remainder, then the first.
    let captured: Vec<i64> = r.body["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["amount_captured"].as_i64().unwrap())
        .collect();
    assert_eq!(captured, vec![334, 334, 333]);
    // payrail's fee on 1,001 (2.9 % + 30 = 59) is the platform's: it has no part of its own.
    assert_eq!(platform_payable(&app).await, -59);

    // Two partial refunds reversing the splits, then the rest without.
    let r1 = refund(&app, &id, json!({ "amount": { "value": 500, "currency": "USD" } })).await;
    assert_eq!(
        (r1["reverse_splits"].as_bool(), r1["refund_application_fee"].as_bool()),
        (Some(true), Some(false))
    );
    refund(&app, &id, json!({ "amount": { "value": 301, "currency": "USD" } })).await;
    refund(
        &app,
        &id,
        json!({ "amount": { "value": 200, "currency": "USD" }, "reverse_splits": false }),
    )
    .await;
    let sellers = [seller(&app, &a).await, seller(&app, &b).await, seller(&app, &c).await];
    let given_back: i64 = sellers.iter().map(|s| -s.1).sum();
    assert_eq!(given_back, 801, "{sellers:?}");
    for (s, got) in sellers.iter().zip([334, 334, 333]) {
        assert_eq!(s.0, got);
        assert!((-s.1 - 267).abs() <= 1, "{sellers:?}");
    }
    // The platform paid the refund that did not reverse the splits.
    assert_eq!(platform_payable(&app).await, -59 - 200);
    let payment = app.get(&format!("/api/v1/payments/{id}")).await.body;
    let returned: i64 = payment["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["amount_returned"].as_i64().unwrap())
        .sum();
    // Every part of the capture is accounted for: 801 from the sellers, 200 covered for them.
    assert_eq!(returned, 1_001);
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn refunding_the_application_fee_is_the_platforms_choice() {
    let app = spawn_app().await;
    let a = account(&app, "A").await;
    let split = json!({ "splits": [{ "account": a, "amount": 9_000 }], "application_fee_amount": 1_000 });
    // Kept: the seller bears the fee's part of a full refund.
    let kept = split_payment(&app, 10_000, "automatic", "pm_card_visa", split.clone()).await;
    refund(&app, kept["payment_id"].as_str().unwrap(), json!({})).await;
    assert_eq!(seller(&app, &a).await, (9_000, -10_000));
    assert_eq!(platform_payable(&app).await, 1_000 - 320);
    // Refunded: the platform gives its fee back, the seller only what it got.
    let given = split_payment(&app, 10_000, "automatic", "pm_card_visa", split).await;
    refund(
        &app,
        given["payment_id"].as_str().unwrap(),
        json!({ "refund_application_fee": true }),
    )
    .await;
    assert_eq!(seller(&app, &a).await, (18_000, -19_000));
    assert_eq!(platform_payable(&app).await, (1_000 - 320) - 320);
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_dispute_debits_the_sellers_and_a_won_one_gives_it_all_back() {
    let app = spawn_app().await;
    let (a, b) = (account(&app, "A").await, account(&app, "B").await);
    let p = split_payment(
        &app,
        5_000,
        "automatic",
        "pm_card_createDispute",
        json!({ "splits": [{ "account": a, "amount": 3_000 }, { "account": b, "amount": 1_500 }],
                "application_fee_amount": 500 }),
    )
    .await;
    let (id, pi) = (
        p["payment_id"].as_str().unwrap().to_owned(),
        p["psp_reference"].as_str().unwrap().to_owned(),
    );
    let platform_before = platform_payable(&app).await;
    let opened = json!({ "id": "du_m1", "object": "dispute", "amount": 5000, "currency": "usd",
                         "reason": "fraudulent", "status": "needs_response", "payment_intent": pi });
    assert_eq!(
        send_event(&app, "evt_m_open", "charge.dispute.created", opened).await,
        200
    );
    wait_for("the dispute", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == "chargeback_open"
    })
    .await;
    // Each seller gives back its part and bears the fee's, in proportion: 3,000 + 333 and
    // 1,500 + 167; the platform keeps its fee.
    assert_eq!(seller(&app, &a).await, (3_000, -3_333));
    assert_eq!(seller(&app, &b).await, (1_500, -1_667));
    assert_eq!(platform_payable(&app).await, platform_before);
    let won = json!({ "id": "du_m1", "object": "dispute", "amount": 5000, "status": "won", "payment_intent": pi });
    assert_eq!(send_event(&app, "evt_m_won", "charge.dispute.closed", won).await, 200);
    wait_for("the won dispute", async || {
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"] == "settled"
    })
    .await;
    assert_eq!(seller(&app, &a).await, (3_000, 0));
    assert_eq!(seller(&app, &b).await, (1_500, 0));
    assert_eq!(platform_payable(&app).await, platform_before);
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn splits_are_refused_unless_every_account_is_the_platforms_and_active() {
    let app = spawn_app().await;
    let a = account(&app, "A").await;
    let disabled = account(&app, "D").await;
    let r = app
        .post(&format!("/api/v1/accounts/{disabled}"), json!({ "status": "disabled" }))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Another platform's account is no account of this one.
    let other_key = app.new_merchant().await;
    let theirs = app
        .request(
            "POST",
            "/api/v1/accounts",
            Some(&other_key),
            Some("k-theirs"),
            Some(r#"{"name":"T","country":"US","default_currency":"USD"}"#),
        )
        .await;
    let theirs = theirs.body["id"].as_str().unwrap().to_owned();
    let create = |splits: Value, fee: Option<i64>| {
        let mut body = json!({ "order_id": "o", "amount": { "value": 1_000, "currency": "USD" },
                               "payment_method": "pm_card_visa", "confirm": true, "splits": splits });
        if let Some(f) = fee {
            body["application_fee_amount"] = json!(f);
        }
        let app = &app;
        async move { app.post("/api/v1/payments", body).await }
    };
    let cases = [
        (
            json!([{ "account": disabled, "amount": 100 }]),
            None,
            "account_inactive",
            "splits[0].account",
        ),
        (
            json!([{ "account": a, "amount": 1 }, { "account": theirs, "amount": 100 }]),
            None,
            "resource_missing",
            "splits[1].account",
        ),
        (
            json!([{ "account": a, "amount": 900 }]),
            Some(101),
            "parameter_invalid",
            "splits",
        ),
        (
            json!([{ "account": a, "amount": 0 }]),
            None,
            "parameter_invalid",
            "splits[0].amount",
        ),
        (
            json!([{ "account": a, "amount": 10 }, { "account": a, "amount": 10 }]),
            None,
            "parameter_invalid",
            "splits",
        ),
        (
            json!([{ "account": "pay_x", "amount": 10 }]),
            None,
            "parameter_invalid",
            "splits[0].account",
        ),
        (json!([]), None, "parameter_invalid", "splits"),
    ];
    for (splits, fee, code, param) in cases {
        let r = create(splits.clone(), fee).await;
        assert_eq!(
            (
                r.status,
                r.body["error"]["code"].as_str(),
                r.body["error"]["param"].as_str()
            ),
            (400, Some(code), Some(param)),
            "{splits}: {}",
            r.body
        );
    }
    let too_many: Vec<Value> = (0..101).map(|_| json!({ "account": a, "amount": 1 })).collect();
    let r = create(json!(too_many), None).await;
    assert_eq!(
        (r.status, r.body["error"]["message"].as_str()),
        (400, Some("a payment has at most 100 splits")),
        "{}",
        r.body
    );
    assert_eq!(app.count("payments").await, 0);
}

#[actix_web::test]
async fn concurrent_transfers_never_overdraw_the_platform() {
    let app = spawn_app().await;
    let a = account(&app, "A").await;
    let b = account(&app, "B").await;
    let r = app.pay(10_000, "pm_card_visa", "automatic", true).await;
    assert_eq!(r.body["status"], "captured", "{}", r.body);
    let balance = platform_payable(&app).await;
    assert_eq!(balance, 10_000 - 320);
    // 50 transfers of 300 at once (15,000 asked of 9,680): exactly the 32 that fit succeed.
    let results = futures_util::future::join_all((0..50).map(|i| {
        let dest = if i % 2 == 0 { a.clone() } else { b.clone() };
        let app = &app;
        async move {
            app.post(
                "/api/v1/transfers",
                json!({ "amount": 300, "currency": "USD", "destination": dest, "transfer_group": "order_7" }),
            )
            .await
        }
    }))
    .await;
    let ok = results.iter().filter(|r| r.status == 201).count() as i64;
    let refused: Vec<&crate::helpers::Response> = results.iter().filter(|r| r.status != 201).collect();
    assert_eq!(ok, balance / 300, "{:?}", refused.first().map(|r| &r.body));
    for r in &refused {
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some("balance_insufficient")),
            "{}",
            r.body
        );
    }
    assert_eq!(platform_payable(&app).await, balance - ok * 300);
    let (_, a_avail) = seller(&app, &a).await;
    let (_, b_avail) = seller(&app, &b).await;
    assert_eq!(a_avail + b_avail, ok * 300);
    assert_eq!(app.count("transfers").await, ok);
    // Listed newest first, a page at a time, every transfer once.
    let mut seen: Vec<String> = Vec::new();
    let mut path = "/api/v1/transfers?limit=10".to_owned();
    loop {
        let page = app.get(&path).await.body;
        let ids: Vec<String> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        seen.extend(ids.iter().cloned());
        if page["has_more"] != true {
            break;
        }
        path = format!("/api/v1/transfers?limit=10&starting_after={}", ids.last().unwrap());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len() as i64, unique.len() as i64), (ok, ok));
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_transfer_is_idempotent_and_reversed_at_most_in_full() {
    let app = spawn_app().await;
    let a = account(&app, "A").await;
    app.pay(5_000, "pm_card_visa", "automatic", true).await;
    let body = json!({ "amount": 1_000, "currency": "USD", "destination": a }).to_string();
    let first = app
        .request("POST", "/api/v1/transfers", Some(DEMO_KEY), Some("tr-key"), Some(&body))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let again = app
        .request("POST", "/api/v1/transfers", Some(DEMO_KEY), Some("tr-key"), Some(&body))
        .await;
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(app.count("transfers").await, 1);
    let id = first.body["id"].as_str().unwrap().to_owned();
    assert_eq!(seller(&app, &a).await, (0, 1_000));

    let part = app
        .post(&format!("/api/v1/transfers/{id}/reversals"), json!({ "amount": 400 }))
        .await;
    assert_eq!(
        (part.status, part.body["amount"].as_i64()),
        (201, Some(400)),
        "{}",
        part.body
    );
    let too_much = app
        .post(&format!("/api/v1/transfers/{id}/reversals"), json!({ "amount": 601 }))
        .await;
    assert_eq!(
        (too_much.status, too_much.body["error"]["code"].as_str()),
        (400, Some("amount_too_large"))
    );
    let rest = app.post(&format!("/api/v1/transfers/{id}/reversals"), json!({})).await;
    assert_eq!(
        (rest.status, rest.body["amount"].as_i64()),
        (201, Some(600)),
        "{}",
        rest.body
    );
    let t = app.get(&format!("/api/v1/transfers/{id}")).await.body;
    assert_eq!(
        (t["amount_reversed"].as_i64(), t["reversed"].as_bool()),
        (Some(1_000), Some(true))
    );
    assert_eq!(seller(&app, &a).await, (0, 0));
    assert_eq!(platform_payable(&app).await, 5_000 - 175);
    let db = app.sql().await;
    let kinds: Vec<String> = db
        .query(
            "SELECT event_type FROM outbox WHERE event_type LIKE 'transfer.%' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["transfer.created", "transfer.reversed", "transfer.reversed"]);
    // The platform's balance transactions list them, and sum to its payable.
    let txns = app.get("/api/v1/balance_transactions?limit=100").await.body;
    let listed: Vec<(String, i64)> = txns["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["type"].as_str().unwrap().to_owned(), t["net"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("transfer_refund".to_owned(), 600),
            ("transfer_refund".to_owned(), 400),
            ("transfer".to_owned(), -1_000),
            ("charge".to_owned(), 5_000 - 175),
        ]
    );
    assert_eq!(listed.iter().map(|t| t.1).sum::<i64>(), platform_payable(&app).await);
    // Another platform can neither see nor reverse it; a disabled account receives nothing.
    let other = app.new_merchant().await;
    let r = app
        .request("GET", &format!("/api/v1/transfers/{id}"), Some(&other), None, None)
        .await;
    assert_eq!(r.status, 404);
    app.post(&format!("/api/v1/accounts/{a}"), json!({ "status": "disabled" }))
        .await;
    let r = app
        .post(
            "/api/v1/transfers",
            json!({ "amount": 1, "currency": "USD", "destination": a }),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("account_inactive"))
    );
    assert_ledger_clean(&app).await;
}

/// The store's own check: a destination disabled or restricted after the request read it as
/// active (here, before the transfer's transaction) receives nothing.
#[actix_web::test]
async fn a_transfer_to_an_account_disabled_since_it_was_read_is_refused() {
    let app = spawn_app().await;
    let a = account(&app, "A").await;
    app.pay(5_000, "pm_card_visa", "automatic", true).await;
    let platform = app.first_merchant().await;
    let transfer = |id: &str| payrail::adapters::postgres::transfers::Transfer {
        id: id.to_owned(),
        platform_id: platform.clone(),
        destination: payrail::domain::AccountId::parse(&a).unwrap(),
        amount: 1_000,
        currency: "USD".into(),
        amount_reversed: 0,
        source_payment: None,
        transfer_group: None,
        metadata: json!({}),
        created_at: chrono::Utc::now(),
    };
    for status in ["restricted", "disabled"] {
        let r = app
            .post(&format!("/api/v1/accounts/{a}"), json!({ "status": status }))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let moved = app
            .state
            .db
            .create_transfer(&transfer(&format!("tr_{status}")))
            .await
            .unwrap();
        assert!(
            matches!(moved, payrail::adapters::postgres::transfers::Moved::Inactive),
            "{status}: {moved:?}"
        );
    }
    assert_eq!(app.count("transfers").await, 0);
    assert_eq!(seller(&app, &a).await, (0, 0));
    // Active again: the same transfer is made.
    let r = app
        .post(&format!("/api/v1/accounts/{a}"), json!({ "status": "active" }))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let moved = app.state.db.create_transfer(&transfer("tr_active")).await.unwrap();
    assert!(
        matches!(moved, payrail::adapters::postgres::transfers::Moved::Created(_)),
        "{moved:?}"
    );
    assert_eq!(seller(&app, &a).await, (0, 1_000));
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_reversal_takes_back_only_what_the_seller_still_has() {
    let app = spawn_app().await;
    let a = manual_account(&app).await;
    app.pay(5_000, "pm_card_visa", "automatic", true).await;
    let payable = platform_payable(&app).await;
    let t = app
        .post(
            "/api/v1/transfers",
            json!({ "amount": 1_000, "currency": "USD", "destination": a }),
        )
        .await;
    assert_eq!(t.status, 201, "{}", t.body);
    let id = t.body["id"].as_str().unwrap().to_owned();
    // The seller is paid 700 of it.
    let po = app
        .post(
            "/api/v1/payouts",
            json!({ "amount": 700, "currency": "USD", "account": a }),
        )
        .await;
    assert_eq!(po.status, 201, "{}", po.body);
    payout_settles(&app, po.body["id"].as_str().unwrap(), "paid").await;
    assert_eq!(seller(&app, &a).await, (0, 300));
    // Reversing more than the seller still has would hand the platform money that already left
    // for the seller's bank, for the platform to pay out a second time: refused, nothing moves.
    for body in [json!({}), json!({ "amount": 301 })] {
        let r = app.post(&format!("/api/v1/transfers/{id}/reversals"), body).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some("balance_insufficient")),
            "{}",
            r.body
        );
    }
    assert_eq!(seller(&app, &a).await, (0, 300));
    assert_eq!(platform_payable(&app).await, payable - 1_000);
    // What the seller still has comes back.
    let back = app
        .post(&format!("/api/v1/transfers/{id}/reversals"), json!({ "amount": 300 }))
        .await;
    assert_eq!(
        (back.status, back.body["amount"].as_i64()),
        (201, Some(300)),
        "{}",
        back.body
    );
    assert_eq!(seller(&app, &a).await, (0, 0));
    assert_eq!(platform_payable(&app).await, payable - 700);
    let t = app.get(&format!("/api/v1/transfers/{id}")).await.body;
    assert_eq!(
        (t["amount_reversed"].as_i64(), t["reversed"].as_bool()),
        (Some(300), Some(false))
    );
    assert_ledger_clean(&app).await;
}

/// POST `body` to `path` as the demo platform with idempotency key `key`.
async fn post_with_key(app: &TestApp, path: &str, key: &str, body: Value) -> crate::helpers::Response {
    app.request("POST", path, Some(DEMO_KEY), Some(key), Some(&body.to_string()))
        .await
}

#[actix_web::test]
async fn a_key_whose_record_expired_finds_what_it_made_and_nothing_else() {
    let app = spawn_app().await;
    let a = manual_account(&app).await;
    app.pay(5_000, "pm_card_visa", "automatic", true).await;
    let db = app.sql().await;
    // The purge of records past `[idempotency] retention_hours`, all at once.
    let expire = async || {
        db.execute("DELETE FROM idempotency_keys", &[]).await.unwrap();
    };
    let reused = |r: &crate::helpers::Response| (r.status, r.body["error"]["code"].as_str().map(str::to_owned));
    let refused = (422, Some("idempotency_key_reused".to_owned()));

    let transfer = |amount: i64| json!({ "amount": amount, "currency": "USD", "destination": a });
    let t = post_with_key(&app, "/api/v1/transfers", "k-tr", transfer(1_000)).await;
    assert_eq!(t.status, 201, "{}", t.body);
    let t2 = post_with_key(&app, "/api/v1/transfers", "k-tr2", transfer(500)).await;
    assert_eq!(t2.status, 201, "{}", t2.body);
    let (t, t2) = (t.body["id"].as_str().unwrap(), t2.body["id"].as_str().unwrap());
    let reversal = |id: &str| format!("/api/v1/transfers/{id}/reversals");
    let r = post_with_key(&app, &reversal(t), "k-rev", json!({ "amount": 100 })).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let po = json!({ "amount": 300, "currency": "USD", "account": a });
    let p = post_with_key(&app, "/api/v1/payouts", "k-po", po.clone()).await;
    assert_eq!(p.status, 201, "{}", p.body);
    expire().await;

    // The same requests again find what they made.
    let again = post_with_key(&app, "/api/v1/transfers", "k-tr", transfer(1_000)).await;
    assert_eq!(
        (again.status, again.body["id"].as_str()),
        (200, Some(t)),
        "{}",
        again.body
    );
    let again = post_with_key(&app, &reversal(t), "k-rev", json!({ "amount": 100 })).await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (200, &r.body["id"]),
        "{}",
        again.body
    );
    let again = post_with_key(&app, "/api/v1/payouts", "k-po", po).await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (200, &p.body["id"]),
        "{}",
        again.body
    );
    expire().await;
    // Other requests with those keys are not answered with what the keys made before.
    let other = post_with_key(&app, "/api/v1/transfers", "k-tr", transfer(999)).await;
    assert_eq!(reused(&other), refused, "{}", other.body);
    let other = post_with_key(&app, &reversal(t), "k-rev", json!({ "amount": 200 })).await;
    assert_eq!(reused(&other), refused, "{}", other.body);
    let other = post_with_key(&app, &reversal(t2), "k-rev", json!({ "amount": 100 })).await;
    assert_eq!(reused(&other), refused, "{}", other.body);
    let more = json!({ "amount": 301, "currency": "USD", "account": a });
    let other = post_with_key(&app, "/api/v1/payouts", "k-po", more).await;
    assert_eq!(reused(&other), refused, "{}", other.body);
    assert_eq!(
        (
            app.count("transfers").await,
            app.count("transfer_reversals").await,
            app.count("payouts").await
        ),
        (2, 1, 1)
    );
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn funds_become_available_on_their_day_once() {
    let app = spawn_app().await;
    let now_account = |name: &'static str, delay: i64| {
        let app = &app;
        async move {
            let r = app
                .post(
                    "/api/v1/accounts",
                    json!({ "name": name, "country": "FR", "default_currency": "USD",
                            "payout_schedule": { "delay_days": delay } }),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["id"].as_str().unwrap().to_owned()
        }
    };
    let (soon, later) = (now_account("Soon", 0).await, now_account("Later", 7).await);
    let p = split_payment(
        &app,
        10_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": soon, "amount": 6_000 }, { "account": later, "amount": 3_000 }] }),
    )
    .await;
    // A refund before the funds are available is taken from the available balance.
    refund(
        &app,
        p["payment_id"].as_str().unwrap(),
        json!({ "amount": { "value": 1_000, "currency": "USD" } }),
    )
    .await;
    assert_eq!(seller(&app, &soon).await, (6_000, -600));
    // The one with no delay is due now; the other in seven days.
    assert_eq!(app.state.db.release_seller_funds(1_000).await.unwrap(), 1);
    assert_eq!(seller(&app, &soon).await, (0, 5_400));
    assert_eq!(seller(&app, &later).await, (3_000, -300));
    // Released once, whatever runs again.
    assert_eq!(app.state.db.release_seller_funds(1_000).await.unwrap(), 0);
    assert_eq!(seller(&app, &soon).await, (0, 5_400));
    let db = app.sql().await;
    let due: i64 = db
        .query_one(
            "SELECT count(*) FROM seller_pending_funds WHERE released_journal IS NULL
             AND available_on BETWEEN now() + interval '6 days 23 hours' AND now() + interval '7 days'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(due, 1);
    assert_ledger_clean(&app).await;
}

/// A payout's status, once it is no longer moving.
async fn payout_settles(app: &TestApp, id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("payout {id} {status}"), async || {
        last = app.get(&format!("/api/v1/payouts/{id}")).await.body;
        last["status"] == status
    })
    .await;
    last
}

#[actix_web::test]
async fn payouts_leave_the_available_balance_and_come_back_if_they_fail() {
    let app = spawn_app().await;
    let a = manual_account(&app).await;
    split_payment(
        &app,
        10_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 8_000 }] }),
    )
    .await;
    // Pending funds are not paid out.
    let early = app
        .post(
            "/api/v1/payouts",
            json!({ "amount": 1, "currency": "USD", "account": a }),
        )
        .await;
    assert_eq!(
        (early.status, early.body["error"]["code"].as_str()),
        (400, Some("balance_insufficient"))
    );
    app.state.db.release_seller_funds(100).await.unwrap();
    assert_eq!(seller(&app, &a).await, (0, 8_000));

    // Paid: the money reaches the bank through payouts_in_transit.
    let paid = app
        .post(
            "/api/v1/payouts",
            json!({ "amount": 5_000, "currency": "USD", "account": a }),
        )
        .await;
    assert_eq!(paid.status, 201, "{}", paid.body);
    assert!(
        ["in_transit", "paid"].contains(&paid.body["status"].as_str().unwrap()),
        "{}",
        paid.body
    );
    let id = paid.body["id"].as_str().unwrap().to_owned();
    payout_settles(&app, &id, "paid").await;
    assert_eq!(seller(&app, &a).await, (0, 3_000));
    // Failed: it comes back to the seller.
    let failed = app
        .post(
            "/api/v1/payouts",
            json!({ "amount": 2_000, "currency": "USD", "account": a, "bank_account": "ba_failure" }),
        )
        .await;
    assert_eq!(failed.status, 201, "{}", failed.body);
    let f = payout_settles(&app, failed.body["id"].as_str().unwrap(), "failed").await;
    assert_eq!(f["failure_code"], "account_closed");
    assert_eq!(seller(&app, &a).await, (0, 3_000));
    // Never more than available.
    let over = app
        .post(
            "/api/v1/payouts",
            json!({ "amount": 3_001, "currency": "USD", "account": a }),
        )
        .await;
    assert_eq!(
        (over.status, over.body["error"]["code"].as_str()),
        (400, Some("balance_insufficient"))
    );
    // The platform pays out its own balance too.
    let own = app
        .post("/api/v1/payouts", json!({ "amount": 1_000, "currency": "USD" }))
        .await;
    assert_eq!(own.status, 201, "{}", own.body);
    payout_settles(&app, own.body["id"].as_str().unwrap(), "paid").await;
    assert_eq!(platform_payable(&app).await, 2_000 - 320 - 1_000);
    // Each event once: the rail's webhooks applied through the bridge.
    let db = app.sql().await;
    let kinds: Vec<String> = db
        .query(
            "SELECT event_type FROM outbox WHERE event_type LIKE 'payout.%' AND body->>'id' = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["payout.created", "payout.updated", "payout.paid"]);
    let bank: i64 = db
        .query_one(
            "SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts WHERE account = 'bank'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bank, 6_000);
    let in_transit: i64 = db
        .query_one(
            "SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts
             WHERE account = 'payouts_in_transit'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_transit, 0);
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn concurrent_payouts_never_exceed_the_available_balance() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/v1/accounts",
            json!({ "name": "A", "country": "FR", "default_currency": "USD",
                    "payout_schedule": { "delay_days": 0, "interval": "manual" }, "bank_account": "ba_delayed" }),
        )
        .await;
    let a = r.body["id"].as_str().unwrap().to_owned();
    split_payment(
        &app,
        10_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 9_000 }] }),
    )
    .await;
    app.state.db.release_seller_funds(100).await.unwrap();
    // 50 payouts of 250 at once (12,500 asked of 9,000): exactly the 36 that fit.
    let results = futures_util::future::join_all((0..50).map(|_| {
        let (app, a) = (&app, a.clone());
        async move {
            app.post(
                "/api/v1/payouts",
                json!({ "amount": 250, "currency": "USD", "account": a }),
            )
            .await
        }
    }))
    .await;
    let ok = results.iter().filter(|r| r.status == 201).count();
    assert_eq!(ok, 36);
    assert!(results
        .iter()
        .filter(|r| r.status != 201)
        .all(|r| r.body["error"]["code"] == "balance_insufficient"));
    assert_eq!(seller(&app, &a).await, (0, 0));
    // On their way (ba_delayed: about 3 s in transit), they are reserved.
    let b = app.get(&format!("/api/v1/accounts/{a}/balance")).await.body;
    assert_eq!(b["reserved"], json!([{ "currency": "USD", "amount": 9_000 }]), "{b}");
    // A payout in transit cannot be canceled; every one of them is paid in the end.
    let first = results.iter().find(|r| r.status == 201).unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancel = app.post(&format!("/api/v1/payouts/{first}/cancel"), json!({})).await;
    assert_eq!(cancel.status, 409, "{}", cancel.body);
    wait_for("every payout paid", async || {
        let db = app.sql().await;
        let paid: i64 = db
            .query_one("SELECT count(*) FROM payouts WHERE status = 'paid'", &[])
            .await
            .unwrap()
            .get(0);
        paid == 36
    })
    .await;
    let b = app.get(&format!("/api/v1/accounts/{a}/balance")).await.body;
    assert_eq!(b["reserved"], json!([]), "{b}");
    // The platform's own balance: available is its payable; nothing held.
    let p = app.get("/api/v1/balance").await.body;
    assert_eq!(
        p["available"],
        json!([{ "currency": "USD", "amount": 1_000 - 320 }]),
        "{p}"
    );
    assert_eq!(p["reserved"], json!([]), "{p}");
    // Nothing of the platform's own waits for a day: its part is payable at capture.
    assert_eq!(p["pending"], json!([{ "currency": "USD", "amount": 0 }]), "{p}");
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_daily_schedule_pays_out_the_available_balance_once_a_day() {
    let app = spawn_app().await;
    let a = funded_seller(
        &app,
        json!({ "name": "A", "country": "FR", "default_currency": "USD",
                "payout_schedule": { "delay_days": 0, "interval": "daily", "minimum": 100 } }),
        1_000,
        700,
    )
    .await;
    payrail::api::payouts::housekeeping(&app.state).await;
    // New funds the same day wait for tomorrow's payout.
    split_payment(
        &app,
        1_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 300 }] }),
    )
    .await;
    app.state.db.release_seller_funds(100).await.unwrap();
    payrail::api::payouts::housekeeping(&app.state).await;
    let list = app.get("/api/v1/payouts").await.body;
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{list}");
    assert_eq!(
        (data[0]["amount"].as_i64(), data[0]["automatic"].as_bool()),
        (Some(700), Some(true))
    );
    payout_settles(&app, data[0]["id"].as_str().unwrap(), "paid").await;
    assert_eq!(seller(&app, &a).await, (0, 300));
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn a_seller_disabled_while_the_schedule_runs_is_not_paid_out() {
    let app = spawn_app().await;
    let a = funded_seller(
        &app,
        json!({ "name": "A", "country": "FR", "default_currency": "USD",
                "payout_schedule": { "delay_days": 0, "interval": "daily" } }),
        1_000,
        700,
    )
    .await;
    // The tick read its due list; the platform disables the seller before its turn comes.
    let due = app.state.db.scheduled_payouts_due(1_000).await.unwrap();
    assert_eq!(due.len(), 1);
    let disabled = app
        .post(&format!("/api/v1/accounts/{a}"), json!({ "status": "disabled" }))
        .await;
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    let d = &due[0];
    let payout = |id: &str| payrail::adapters::postgres::payouts::Payout {
        id: id.to_owned(),
        platform_id: d.platform.clone(),
        account: Some(d.account.clone()),
        amount: d.available,
        currency: d.currency.clone(),
        status: "pending".into(),
        bank_account: d.bank_account.clone(),
        automatic: true,
        failure_code: None,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
    };
    let made = app.state.db.create_payout(&payout("po_sched_test")).await.unwrap();
    assert!(
        matches!(made, payrail::adapters::postgres::transfers::Moved::Inactive),
        "a disabled seller was paid out"
    );
    assert_eq!(seller(&app, &a).await, (0, 700));

    // A payout made while the seller was active, not yet handed to the rail when it was
    // disabled: it stays pending (cancelable), and the rail never gets it.
    let enabled = app
        .post(&format!("/api/v1/accounts/{a}"), json!({ "status": "active" }))
        .await;
    assert_eq!(enabled.status, 200, "{}", enabled.body);
    let made = app.state.db.create_payout(&payout("po_sched_test2")).await.unwrap();
    assert!(matches!(
        made,
        payrail::adapters::postgres::transfers::Moved::Created(_)
    ));
    app.post(&format!("/api/v1/accounts/{a}"), json!({ "status": "disabled" }))
        .await;
    let handed = app.state.db.payout_in_transit("po_sched_test2").await.unwrap().unwrap();
    assert_eq!(handed.status, "pending");
    let canceled = app.post("/api/v1/payouts/po_sched_test2/cancel", json!({})).await;
    assert_eq!(
        (canceled.status, canceled.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        canceled.body
    );
    assert_eq!(seller(&app, &a).await, (0, 700));
    assert_ledger_clean(&app).await;
}

#[actix_web::test]
async fn payout_events_apply_once_a_pending_payout_cancels_and_a_canceled_one_takes_no_outcome() {
    use payrail::adapters::postgres::payouts::Payout;
    use payrail::adapters::postgres::transfers::Moved;
    // A secrets key, so that the platform can have a connector with a webhook secret of its own.
    let app =
        spawn_app_with(|c| c.secrets.key = "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0".into())
            .await;
    let a = manual_account(&app).await;
    let p = split_payment(
        &app,
        10_000,
        "automatic",
        "pm_card_visa",
        json!({ "splits": [{ "account": a, "amount": 6_000 }] }),
    )
    .await;
    let platform = p["merchant_id"].as_str().unwrap().to_owned();
    app.state.db.release_seller_funds(100).await.unwrap();
    // Payouts made as the API makes them, but not handed to the rail: pending.
    let pending = |id: &str, amount: i64| Payout {
        id: id.to_owned(),
        platform_id: payrail::domain::MerchantId::parse(&platform).unwrap(),
        account: payrail::domain::AccountId::parse(&a),
        amount,
        currency: "USD".into(),
        status: "pending".into(),
        bank_account: "ba_success".into(),
        automatic: false,
        failure_code: None,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
    };
    for (id, amount) in [("po_cancel", 1_000), ("po_events", 2_000)] {
        assert!(matches!(
            app.state.db.create_payout(&pending(id, amount)).await.unwrap(),
            Moved::Created(_)
        ));
    }
    assert_eq!(seller(&app, &a).await, (0, 3_000));

    // A pending payout (never handed to the rail) cancels: its money comes back.
    let c = app.post("/api/v1/payouts/po_cancel/cancel", json!({})).await;
    assert_eq!(
        (c.status, c.body["status"].as_str()),
        (200, Some("canceled")),
        "{}",
        c.body
    );
    assert_eq!(seller(&app, &a).await, (0, 4_000));
    // An outcome for a canceled payout moves nothing.
    let paid = |id: &str, amount: i64| json!({ "id": id, "object": "payout", "amount": amount, "currency": "usd", "status": "paid" });
    assert_eq!(
        send_event(&app, "evt_po_late", "payout.paid", paid("po_cancel", 1_000)).await,
        200
    );
    // The other: in transit, then paid — the same event twice and another one saying the same.
    app.state.db.payout_in_transit("po_events").await.unwrap();
    let cancel = app.post("/api/v1/payouts/po_events/cancel", json!({})).await;
    assert_eq!(
        (cancel.status, cancel.body["error"]["code"].as_str()),
        (409, Some("payout_not_cancelable"))
    );
    for id in ["evt_po_1", "evt_po_1", "evt_po_2"] {
        assert_eq!(send_event(&app, id, "payout.paid", paid("po_events", 2_000)).await, 200);
    }
    // One saying another amount is refused, and so is one that names no amount or currency.
    assert_eq!(
        send_event(&app, "evt_po_odd", "payout.failed", paid("po_events", 1)).await,
        200
    );
    let bare = json!({ "id": "po_events", "object": "payout", "status": "failed" });
    assert_eq!(send_event(&app, "evt_po_bare", "payout.failed", bare).await, 200);
    let db = app.sql().await;
    wait_for("the payout events processed", async || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM processed_events
                 WHERE event_id IN ('evt_po_late', 'evt_po_1', 'evt_po_2', 'evt_po_odd', 'evt_po_bare')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 5
    })
    .await;
    // The platform's own connector secret signs events about its payments only: a payout's
    // "failure" it signed (after the money reached the bank) is dropped, never applied.
    let token = app.state.config.admin.token.clone();
    let secret = "whsec_platform_connector_secret";
    let c = app
        .request(
            "POST",
            &format!("/admin/v1/merchants/{platform}/connectors"),
            Some(&token),
            None,
            Some(
                &json!({ "connector_id": "mca_platform", "psp": "sandbox", "label": "P",
                         "credentials": { "webhook_secret": secret } })
                .to_string(),
            ),
        )
        .await;
    assert_eq!(c.status, 201, "{}", c.body);
    let mut forged = paid("po_events", 2_000);
    forged["status"] = json!("failed");
    let body = json!({ "id": "evt_po_forged", "object": "event", "type": "payout.failed", "created": 1,
                       "data": { "object": forged } })
    .to_string();
    let signature =
        payrail::adapters::psp::signature::sign_stripe(body.as_bytes(), secret, chrono::Utc::now().timestamp());
    let r = app
        .client
        .post(format!("{}/internal/webhooks/psp/sandbox/mca_platform", app.address))
        .insert_header(("Stripe-Signature", signature))
        .insert_header(("Content-Type", "application/json"))
        .send_body(body)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    wait_for_event_outcome(&app, "foreign").await;
    assert_eq!(app.get("/api/v1/payouts/po_cancel").await.body["status"], "canceled");
    assert_eq!(app.get("/api/v1/payouts/po_events").await.body["status"], "paid");
    let journals = |kind: &'static str| {
        let db = &db;
        async move {
            db.query_one("SELECT count(*) FROM journals WHERE kind = $1", &[&kind])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(journals("payout_paid").await, 1);
    // The bank returns it later: the money comes back to the seller, from the bank.
    let mut failed = paid("po_events", 2_000);
    failed["status"] = json!("failed");
    failed["failure_code"] = json!("account_closed");
    assert_eq!(send_event(&app, "evt_po_returned", "payout.failed", failed).await, 200);
    payout_settles(&app, "po_events", "failed").await;
    assert_eq!(seller(&app, &a).await, (0, 6_000));
    assert_eq!(journals("payout_returned").await, 2);
    assert_eq!(from_bank(&db).await, 0);
    assert_ledger_clean(&app).await;
}

async fn from_bank(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(credit_total - debit_total), 0)::bigint FROM ledger_accounts WHERE account = 'bank'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
