//! The marketplace simulation: 1,000 payments of one platform with random splits, partial
//! captures, refunds, disputes, transfers, reversals and payouts, run concurrently through the
//! API, then every balance checked against every other record of the same money.
//! `MARKETPLACE_SEED` replays a run; a failure prints its seed.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::events::{send_event, wait_for};
use crate::helpers::{spawn_app_with, Response, TestApp};

const PAYMENTS: usize = 1_000;
const SELLERS: usize = 20;
/// Requests in flight at once.
const WAVE: usize = 50;

async fn waves(app: &TestApp, reqs: Vec<(String, Value)>) -> Vec<Response> {
    let mut out = Vec::with_capacity(reqs.len());
    for chunk in reqs.chunks(WAVE) {
        let batch = futures_util::future::join_all(chunk.iter().map(|(path, body)| app.post(path, body.clone()))).await;
        out.extend(batch);
    }
    out
}

/// Σ credit − Σ debit of `account`, straight from the entries.
async fn from_entries(db: &tokio_postgres::Client, account: &str) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(credit) - sum(debit), 0)::bigint FROM entries WHERE account = $1",
        &[&account],
    )
    .await
    .unwrap()
    .get(0)
}

#[actix_web::test]
async fn a_thousand_payments_of_a_marketplace_keep_every_balance_true() {
    let seed: u64 = std::env::var("MARKETPLACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("marketplace simulation: MARKETPLACE_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Disputes open a moment after the charge; the rest of the run is what takes time.
    let app = spawn_app_with(|c| c.psp.sandbox.dispute_delay_ms = 50).await;
    assert!(app.state.sandbox.is_some());

    // Sellers whose funds are available at once and paid out only on request.
    let reqs: Vec<(String, Value)> = (0..SELLERS)
        .map(|i| {
            (
                "/api/v1/accounts".to_owned(),
                json!({ "name": format!("Seller {i}"), "country": "FR", "default_currency": "USD",
                        "payout_schedule": { "delay_days": 0, "interval": "manual" } }),
            )
        })
        .collect();
    let sellers: Vec<String> = waves(&app, reqs)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["id"].as_str().unwrap().to_owned()
        })
        .collect();

    // 1,000 payments: up to five splits each, a fee, some left to the platform; one in ten
    // disputed by its card, half of the rest captured by hand (partially).
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Disputed,
        Manual,
        Automatic,
    }
    let mut kinds = Vec::with_capacity(PAYMENTS);
    let reqs: Vec<(String, Value)> = (0..PAYMENTS)
        .map(|i| {
            let amount: i64 = rng.gen_range(1_000..200_000);
            let fee = amount * rng.gen_range(0..15) / 100;
            let mut left = (amount - fee) * rng.gen_range(60..=100) / 100;
            let n = rng.gen_range(0..=5usize);
            let mut picked: Vec<usize> = Vec::new();
            let mut splits = Vec::new();
            for k in 0..n {
                let s = rng.gen_range(0..SELLERS);
                if picked.contains(&s) || left <= 0 {
                    continue;
                }
                picked.push(s);
                let a = if k + 1 == n { left } else { rng.gen_range(1..=left) };
                left -= a;
                splits.push(json!({ "account": sellers[s], "amount": a }));
            }
            let kind = match rng.gen_range(0..10) {
                0 => Kind::Disputed,
                1..=5 => Kind::Manual,
                _ => Kind::Automatic,
            };
            kinds.push(kind);
            let method = if kind == Kind::Disputed {
                "pm_card_createDispute"
            } else {
                "pm_card_visa"
            };
            let capture = if kind == Kind::Manual { "manual" } else { "automatic" };
            let mut body = json!({ "order_id": format!("sim_{i}"), "amount": { "value": amount, "currency": "USD" },
                                   "payment_method": method, "capture_strategy": capture, "confirm": true,
                                   "application_fee_amount": fee });
            if !splits.is_empty() {
                body["splits"] = json!(splits);
            }
            ("/api/v1/payments".to_owned(), body)
        })
        .collect();
    let created = waves(&app, reqs).await;
    let mut payments: Vec<(String, Kind, i64)> = Vec::new();
    for (r, kind) in created.iter().zip(&kinds) {
        assert_eq!(r.status, 201, "{}", r.body);
        payments.push((
            r.body["payment_id"].as_str().unwrap().to_owned(),
            *kind,
            r.body["amount"]["value"].as_i64().unwrap(),
        ));
    }

    // Partial captures of the manual ones.
    let reqs: Vec<(String, Value)> = payments
        .iter()
        .filter(|p| p.1 == Kind::Manual)
        .map(|(id, _, amount)| {
            let value = (amount * rng.gen_range(30..=100) / 100).max(1);
            (
                format!("/api/v1/payments/{id}/capture"),
                json!({ "amount": { "value": value, "currency": "USD" } }),
            )
        })
        .collect();
    for r in waves(&app, reqs).await {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let platform_id = created[0].body["merchant_id"].as_str().unwrap().to_owned();

    // Everything captured so far is available to its sellers (delay 0): released now, so
    // that payouts have something to take while refunds and disputes go on.
    app.state.db.release_seller_funds(10_000).await.unwrap();

    // Half of the sellers are paid out all they have first: what refunds take from them next
    // takes them below zero (carried, to be made whole by their next funds).
    let mut drain: Vec<(String, Value)> = Vec::new();
    for acct in &sellers[SELLERS / 2..] {
        let b = app.get(&format!("/api/v1/accounts/{acct}/balance")).await.body;
        let available = b["available"]
            .as_array()
            .unwrap()
            .first()
            .map(|x| x["amount"].as_i64().unwrap())
            .unwrap_or(0);
        if available > 0 {
            drain.push((
                "/api/v1/payouts".to_owned(),
                json!({ "amount": available, "currency": "USD", "account": acct }),
            ));
        }
    }
    for r in waves(&app, drain).await {
        assert_eq!(r.status, 201, "{}", r.body);
    }

    // One wave of everything at once: refunds (with every flag), transfers from the platform,
    // payouts of the sellers. Refunds go to undisputed payments (a disputed one refuses them).
    let mut mixed: Vec<(String, Value)> = Vec::new();
    for (id, kind, amount) in &payments {
        if *kind != Kind::Disputed && rng.gen_bool(0.4) {
            let value = (amount * rng.gen_range(1..=30) / 100).max(1);
            mixed.push((
                format!("/api/v1/payments/{id}/refunds"),
                json!({ "amount": { "value": value, "currency": "USD" },
                        "reverse_splits": rng.gen_bool(0.8), "refund_application_fee": rng.gen_bool(0.3) }),
            ));
        }
    }
    // Transfers, to half of the sellers (the other half only loses what payouts, refunds and
    // disputes take): most small, one in ten more than the platform could ever have.
    for _ in 0..200 {
        let to = &sellers[rng.gen_range(0..SELLERS / 2)];
        let amount: i64 = if rng.gen_bool(0.1) {
            1_000_000_000
        } else {
            rng.gen_range(100..20_000)
        };
        mixed.push((
            "/api/v1/transfers".to_owned(),
            json!({ "amount": amount, "currency": "USD", "destination": to }),
        ));
    }
    // Payouts that drain the sellers: two each, of 40 to 110 % of what each has now, so that
    // some do not fit and the refunds and disputes that follow find little or nothing left.
    for acct in &sellers {
        let b = app.get(&format!("/api/v1/accounts/{acct}/balance")).await.body;
        let available = b["available"]
            .as_array()
            .unwrap()
            .first()
            .map(|x| x["amount"].as_i64().unwrap())
            .unwrap_or(0);
        for _ in 0..2 {
            let bank = ["ba_success", "ba_success", "ba_delayed", "ba_failure"][rng.gen_range(0..4)];
            let amount = (available * rng.gen_range(40..=110) / 100).max(1);
            mixed.push((
                "/api/v1/payouts".to_owned(),
                json!({ "amount": amount, "currency": "USD", "account": acct, "bank_account": bank }),
            ));
        }
    }
    // Shuffled, so that each wave mixes them.
    for i in (1..mixed.len()).rev() {
        let j = rng.gen_range(0..=i);
        mixed.swap(i, j);
    }
    let answers = waves(&app, mixed.clone()).await;
    let mut transfers = Vec::new();
    let (mut transfers_refused, mut payouts_refused) = (0, 0);
    for ((path, _), r) in mixed.iter().zip(&answers) {
        let ok = match r.status {
            201 => true,
            // The balances a transfer or payout asked for were not there: refused, nothing moved.
            400 if r.body["error"]["code"] == "balance_insufficient" => false,
            _ => panic!("{path}: {} {}", r.status, r.body),
        };
        match (ok, path.as_str()) {
            (true, "/api/v1/transfers") => transfers.push(r.body["id"].as_str().unwrap().to_owned()),
            (false, "/api/v1/transfers") => transfers_refused += 1,
            (false, _) => payouts_refused += 1,
            _ => {}
        }
    }
    // The run pushed both limits: some of each did not fit.
    assert!(
        transfers_refused > 0 && payouts_refused > 0,
        "seed {seed}: {transfers_refused} transfers and {payouts_refused} payouts refused"
    );
    let refused = transfers_refused + payouts_refused;
    // Some transfers reversed, in part or whole.
    let mut reqs: Vec<(String, Value)> = Vec::new();
    for t in &transfers {
        if rng.gen_bool(0.3) {
            let body = if rng.gen_bool(0.5) {
                json!({})
            } else {
                json!({ "amount": 50 })
            };
            reqs.push((format!("/api/v1/transfers/{t}/reversals"), body));
        }
    }
    // A reversal takes back only what its seller still has available (payouts ran above).
    for r in waves(&app, reqs).await {
        assert!(
            r.status == 201 || (r.status == 400 && r.body["error"]["code"] == "balance_insufficient"),
            "{}",
            r.body
        );
    }

    // The disputes open by themselves; close each, won or lost.
    let disputed: Vec<&(String, Kind, i64)> = payments.iter().filter(|p| p.1 == Kind::Disputed).collect();
    wait_for("every dispute open", async || {
        let db = app.sql().await;
        let open: i64 = db
            .query_one("SELECT count(*) FROM payments WHERE status = 'chargeback_open'", &[])
            .await
            .unwrap()
            .get(0);
        open as usize == disputed.len()
    })
    .await;
    let mut won = 0;
    for (id, _, _) in &disputed {
        let p = app.get(&format!("/api/v1/payments/{id}")).await.body;
        let pi = p["psp_reference"].as_str().unwrap().to_owned();
        let outcome = if rng.gen_bool(0.5) { "won" } else { "lost" };
        won += usize::from(outcome == "won");
        let closed = json!({ "id": format!("du_{}", pi.trim_start_matches("pi_")), "object": "dispute",
                             "status": outcome, "payment_intent": pi });
        assert_eq!(
            send_event(&app, &format!("evt_close_{id}"), "charge.dispute.closed", closed).await,
            200
        );
    }
    let db = app.sql().await;
    wait_for("every dispute closed and every payout settled", async || {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM payments WHERE status = 'chargeback_open'),
                        (SELECT count(*) FROM payouts WHERE status IN ('pending', 'in_transit')),
                        (SELECT count(*) FROM disputes WHERE status = 'won')",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0 && row.get::<_, i64>(1) == 0 && row.get::<_, i64>(2) as usize == won
    })
    .await;
    app.state.db.release_seller_funds(10_000).await.unwrap();

    // 1. The ledger: every journal balances, Σ over all accounts is zero per currency, every
    //    balance row equals its entries.
    let report = app.state.db.verify_ledger().await.unwrap();
    assert!(report.is_clean(), "seed {seed}: {report:?}");

    // 2. What each payment's splits say each seller got and gave back, plus transfers less
    //    reversals, less payouts not returned, is what the ledger says the seller has.
    let mut by_payments: HashMap<String, i64> = HashMap::new();
    for (id, _, _) in &payments {
        let p = app.get(&format!("/api/v1/payments/{id}")).await.body;
        for s in p["splits"].as_array().unwrap() {
            let net = s["amount_captured"].as_i64().unwrap() - s["amount_debited"].as_i64().unwrap();
            *by_payments
                .entry(s["account"].as_str().unwrap().to_owned())
                .or_default() += net;
        }
    }
    let sums: BTreeMap<String, i64> = db
        .query(
            "SELECT acct, sum(v)::bigint FROM (
                 SELECT destination AS acct, amount - amount_reversed AS v FROM transfers
                 UNION ALL
                 SELECT account, -amount FROM payouts WHERE status IN ('pending', 'in_transit', 'paid')) x
             GROUP BY acct",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut negative = 0;
    for acct in &sellers {
        let b = app.get(&format!("/api/v1/accounts/{acct}/balance")).await.body;
        let side = |name: &str| {
            b[name]
                .as_array()
                .unwrap()
                .first()
                .map(|x| x["amount"].as_i64().unwrap())
                .unwrap_or(0)
        };
        let (pending, available) = (side("pending"), side("available"));
        // The API's balance is the entries' balance.
        assert_eq!(
            pending,
            from_entries(&db, &format!("seller_pending:{acct}")).await,
            "seed {seed}"
        );
        assert_eq!(
            available,
            from_entries(&db, &format!("seller_available:{acct}")).await,
            "seed {seed}"
        );
        // Everything captured is released: nothing waits.
        assert_eq!(pending, 0, "seed {seed}: {acct}");
        let expected = by_payments.get(acct).copied().unwrap_or(0) + sums.get(acct).copied().unwrap_or(0);
        assert_eq!(pending + available, expected, "seed {seed}: {acct}");
        // 3. Below zero only by what refunds, disputes and reversals took after the seller's
        //    first payout (a payout itself never takes more than is there).
        if available < 0 {
            negative += 1;
            let taken: i64 = db
                .query_one(
                    "SELECT coalesce(sum(e.debit), 0)::bigint FROM entries e JOIN journals j ON j.id = e.journal_id
                     WHERE e.account = $1 AND j.kind IN ('refund', 'dispute_opened')
                       AND j.created_at > (SELECT min(created_at) FROM payouts WHERE account = $2)",
                    &[&format!("seller_available:{acct}"), acct],
                )
                .await
                .unwrap()
                .get(0);
            assert!(
                taken >= -available,
                "seed {seed}: {acct} at {available}, refunds, disputes and reversals took {taken}"
            );
        }
    }
    // 4. Every payout that left is at the bank; none is still in transit.
    let paid: i64 = db
        .query_one(
            "SELECT coalesce(sum(amount), 0)::bigint FROM payouts WHERE status = 'paid'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(from_entries(&db, "bank").await, paid, "seed {seed}");
    assert_eq!(from_entries(&db, "payouts_in_transit").await, 0, "seed {seed}");
    let payable = from_entries(&db, &format!("merchant_payable:{platform_id}")).await;
    eprintln!(
        "marketplace simulation: seed {seed}: {} payments, {} transfers, {refused} transfers and payouts refused, \
         {} disputes ({won} won), {negative} sellers below zero after payouts, platform payable {payable}",
        payments.len(),
        transfers.len(),
        disputed.len()
    );
}
