//! Merchant reporting: balance transactions, CSV exports streamed across pages, receipts.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp, DEMO_KEY};

async fn pay(app: &TestApp, amount: i64, order: &str) -> String {
    let r = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": order, "amount": { "value": amount, "currency": "USD" },
                    "payment_method": "pm_card_visa", "capture_strategy": "automatic", "confirm": true }),
        )
        .await;
    assert_eq!(r.body["status"], "captured", "{}", r.body);
    r.body["payment_id"].as_str().unwrap().to_owned()
}

async fn refund(app: &TestApp, id: &str, amount: i64) {
    let r = app
        .post(
            &format!("/api/v1/payments/{id}/refunds"),
            json!({ "amount": { "value": amount, "currency": "USD" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

async fn text(app: &TestApp, path: &str, key: Option<&str>) -> (u16, String, String) {
    let mut req = app.client.get(format!("{}{path}", app.address));
    if let Some(k) = key {
        req = req.insert_header(("Authorization", format!("Bearer {k}")));
    }
    let mut resp = req.send().await.unwrap().timeout(std::time::Duration::from_secs(60));
    let body = resp.body().limit(64 << 20).await.unwrap();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status().as_u16(), ctype, String::from_utf8(body.to_vec()).unwrap())
}

#[actix_web::test]
async fn balance_transactions_list_the_merchants_movements_newest_first() {
    let app = spawn_app().await;
    let a = pay(&app, 10_000, "ord_a").await;
    let b = pay(&app, 2_000, "ord_b").await;
    refund(&app, &a, 2_500).await;
    let r = app.get("/api/v1/balance_transactions").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.body["data"].as_array().unwrap();
    let seen: Vec<(String, String, i64, i64, i64)> = data
        .iter()
        .map(|t| {
            (
                t["type"].as_str().unwrap().to_owned(),
                t["source"].as_str().unwrap().to_owned(),
                t["amount"].as_i64().unwrap(),
                t["fee"].as_i64().unwrap(),
                t["net"].as_i64().unwrap(),
            )
        })
        .collect();
    // Platform fee: 2.9 % + 30 (config.toml's defaults).
    assert_eq!(
        seen,
        vec![
            ("refund".into(), a.clone(), -2_500, 0, -2_500),
            ("charge".into(), b.clone(), 2_000, 88, 1_912),
            ("charge".into(), a.clone(), 10_000, 320, 9_680),
        ]
    );
    // The merchant's balance is the sum of its movements.
    let balance = app.get("/api/v1/balance").await;
    let net: i64 = seen.iter().map(|t| t.4).sum();
    assert!(
        balance.body.to_string().contains(&net.to_string()),
        "{} vs {net}",
        balance.body
    );
    // Cursor pagination.
    let first = app.get("/api/v1/balance_transactions?limit=1").await;
    assert_eq!(first.body["has_more"], true);
    let after = first.body["data"][0]["id"].as_str().unwrap();
    assert!(after.starts_with("jr_"));
    let rest = app
        .get(&format!("/api/v1/balance_transactions?limit=10&starting_after={after}"))
        .await;
    assert_eq!(rest.body["data"].as_array().unwrap().len(), 2);
    assert_eq!(rest.body["has_more"], false);
    // A window in the future holds nothing; a bad cursor is a 400; another merchant sees none.
    let future = app.get("/api/v1/balance_transactions?created[gte]=4102444800").await;
    assert_eq!(future.body["data"].as_array().unwrap().len(), 0);
    for cursor in ["pay_x", "jr_", "jr_a-b", "jr_%00"] {
        let r = app
            .get(&format!("/api/v1/balance_transactions?starting_after={cursor}"))
            .await;
        assert_eq!(r.status, 400, "{cursor}: {}", r.body);
    }
    let other = app.new_merchant().await;
    let theirs = app
        .request("GET", "/api/v1/balance_transactions", Some(&other), None, None)
        .await;
    assert_eq!(theirs.body["data"].as_array().unwrap().len(), 0);
}

#[actix_web::test]
async fn exports_stream_every_row_across_pages_as_csv() {
    let app = spawn_app().await;
    let first = pay(&app, 1234, "ord,with \"quotes\"").await;
    refund(&app, &first, 234).await;
    // 4,500 more payments, copied in SQL from the first: the export runs over three pages.
    let db = app.sql().await;
    db.execute(
        "INSERT INTO payments (id, merchant_id, order_id, status, amount, currency, amount_capturable, amount_captured,
             amount_refunded, refund_pending, amount_disputed, settled, capture_strategy, payment_method, psp,
             psp_reference, fee_bps, fee_fixed, version, transitions, created_at, updated_at)
         SELECT 'pay_copy' || lpad(g::text, 6, '0'), merchant_id, 'ord_' || g, 'captured', 100 + g, currency, 0, 100 + g,
                0, 0, 0, false, capture_strategy, payment_method, psp, 'pi_copy' || g, fee_bps, fee_fixed, 2, 2,
                created_at - (4501 - g) * interval '1 millisecond', updated_at
         FROM payments p, generate_series(1, 4500) g WHERE p.id = $1",
        &[&first],
    )
    .await
    .unwrap();
    let (status, ctype, csv) = text(&app, "/api/v1/reports/payments.csv", Some(DEMO_KEY)).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header[0], "payment_id");
    assert_eq!(header.len(), 12);
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 4501);
    assert_eq!(&rows[0][0], "pay_copy000001");
    assert_eq!(&rows[4499][0], "pay_copy004500");
    assert_eq!(&rows[4500][0], first.as_str());
    assert_eq!(&rows[4500][9], "ord,with \"quotes\"");
    assert_eq!(&rows[4499][9], "ord_4500");
    assert_eq!((&rows[4500][5], &rows[4500][6]), ("1234", "234"));
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.get(0).unwrap()).collect();
    assert_eq!(ids.len(), 4501, "no row twice");
    // A window: from is included, to is not.
    let from: String = db
        .query_one("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM payments WHERE id = 'pay_copy000010'", &[])
        .await
        .unwrap()
        .get(0);
    let to: String = db
        .query_one("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM payments WHERE id = 'pay_copy000020'", &[])
        .await
        .unwrap()
        .get(0);
    let (_, _, window) = text(
        &app,
        &format!("/api/v1/reports/payments.csv?from={from}&to={to}"),
        Some(DEMO_KEY),
    )
    .await;
    assert_eq!(window.lines().count(), 1 + 10, "{window}");
    // Balance transactions: the capture and the refund.
    let (status, _, csv) = text(&app, "/api/v1/reports/balance_transactions.csv", Some(DEMO_KEY)).await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "id,created_at,type,source,amount,fee,net,currency");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].contains(&format!(",charge,{first},1234,66,1168,USD")), "{csv}");
    assert!(lines[2].contains(&format!(",refund,{first},-234,0,-234,USD")), "{csv}");
    // The key is required; a reversed window is refused; another merchant's export is empty.
    assert_eq!(text(&app, "/api/v1/reports/payments.csv", None).await.0, 401);
    assert_eq!(
        text(&app, "/api/v1/reports/payments.csv?from=2000&to=1000", Some(DEMO_KEY))
            .await
            .0,
        400
    );
    let other = app.new_merchant().await;
    let (_, _, theirs) = text(&app, "/api/v1/reports/payments.csv", Some(&other)).await;
    assert_eq!(theirs.lines().count(), 1);
}

/// An order id a spreadsheet would run as a formula is exported as text; the API still answers
/// the order id as it was given.
#[actix_web::test]
async fn an_order_id_that_reads_as_a_formula_is_exported_as_text() {
    let app = spawn_app().await;
    let formula = "=HYPERLINK(\"https://evil.example\",\"x\")";
    let id = pay(&app, 500, formula).await;
    let plain = pay(&app, 600, "ord-1").await;
    let (status, _, csv) = text(&app, "/api/v1/reports/payments.csv", Some(DEMO_KEY)).await;
    assert_eq!(status, 200);
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let order = |id: &str| rows.iter().find(|r| &r[0] == id).map(|r| r[9].to_owned()).unwrap();
    assert_eq!(order(&id), format!("'{formula}"));
    assert_eq!(order(&plain), "ord-1");
    let r = app.get(&format!("/api/v1/payments/{id}")).await;
    assert_eq!(r.body["order_id"], formula);
}

#[actix_web::test]
async fn a_receipt_is_a_page_the_customer_opens_with_its_token_alone() {
    let app = spawn_app().await;
    let id = pay(&app, 4999, "ord_receipt").await;
    refund(&app, &id, 999).await;
    let r = app.get(&format!("/api/v1/payments/{id}/receipt")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "receipt");
    assert_eq!(r.body["card"], json!({ "brand": "visa", "last4": "4242" }));
    assert_eq!(r.body["merchant"]["name"], "Demo Marketplace");
    assert_eq!(r.body["refunds"][0]["amount"]["value"], 999);
    let url = r.body["receipt_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&app.address), "{url}");
    // The same token every time.
    let again = app.get(&format!("/api/v1/payments/{id}/receipt")).await;
    assert_eq!(again.body["receipt_url"], Value::String(url.clone()));
    let path = url.strip_prefix(&app.address).unwrap();
    let (status, ctype, html) = text(&app, path, None).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    for expected in [
        "Receipt from Demo Marketplace",
        "USD 49.99",
        "USD 40.00",
        "visa •••• 4242",
        "−USD 9.99",
        id.as_str(),
    ] {
        assert!(html.contains(expected), "{expected} not in {html}");
    }
    assert!(!html.contains("4242424242424242"));
    // A hundred failed refunds before it do not push the one that succeeded off the page.
    app.sql()
        .await
        .execute(
            "INSERT INTO refunds (id, payment_id, merchant_id, amount, currency, status, created_at, updated_at)
             SELECT 're_failed_' || i, p.id, p.merchant_id, 1, p.currency, 'failed',
                    now() - interval '1 day', now() - interval '1 day'
             FROM payments p, generate_series(1, 100) i WHERE p.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (_, _, html) = text(&app, path, None).await;
    assert!(
        html.contains("−USD 9.99"),
        "the refund that succeeded is not on the page: {html}"
    );
    assert!(!html.contains("−USD 0.01"), "a failed refund is on the page");
    // Unknown or malformed tokens: a 404 page that says nothing more.
    let (status, _, html) = text(&app, "/receipts/rcpt_00000000000000000000000000000000", None).await;
    assert_eq!(status, 404);
    assert!(html.contains("Receipt not found"));
    assert_eq!(text(&app, "/receipts/pay_1", None).await.0, 404);
    // Nothing captured: no receipt.
    let manual = app
        .post(
            "/api/v1/payments",
            json!({ "order_id": "ord_m", "amount": { "value": 500, "currency": "USD" },
                    "payment_method": "pm_card_visa", "capture_strategy": "manual", "confirm": true }),
        )
        .await;
    let m = manual.body["payment_id"].as_str().unwrap();
    let r = app.get(&format!("/api/v1/payments/{m}/receipt")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    // Another merchant cannot make one.
    let other = app.new_merchant().await;
    let r = app
        .request(
            "GET",
            &format!("/api/v1/payments/{id}/receipt"),
            Some(&other),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 404);
}
