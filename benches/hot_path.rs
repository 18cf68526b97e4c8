//! The in-process pieces every payment goes through, without PostgreSQL or NATS, so that a
//! regression in one shows without a full load run: a create request's parsing and validation,
//! the state machine's decisions for create+confirm with automatic capture, the column arrays of
//! a ledger batch of 64 such commits, the payment object a reply and an event carry, and a PSP
//! webhook's signature check. `cargo bench --bench hot_path`.

use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use payrail::adapters::postgres::commit::{AttemptOutcome, Columns, Commit, IdempotencyWrite, OutboxEvent, Transition};
use payrail::adapters::postgres::merchants::Merchant;
use payrail::adapters::psp::signature::{sign_stripe, verify_stripe};
use payrail::api::payments::parse_create;
use payrail::domain::ledger::{postings, Journal};
use payrail::domain::{decide, AttemptId, Currency, Input, JournalKind, MerchantId, Payment, PaymentState, Status};

const CREATE: &[u8] = br#"{"order_id":"ord_8841","amount":{"value":4999,"currency":"USD"},
    "payment_method":"pm_card_visa","capture_strategy":"automatic","confirm":true,
    "customer_id":"cus_42","description":"2 items",
    "metadata":{"cart_id":"cart_abc","channel":"web"},
    "customer":{"email":"someone@shop.example","ip":"203.0.113.9","country":"FR"}}"#;

fn merchant() -> Merchant {
    Merchant {
        id: MerchantId::parse("mer_0190f3a2b4c5d6e7f8a9b0c1d2e3f4a5").unwrap(),
        name: "Demo Shop".into(),
        default_currency: Currency::parse("USD").unwrap(),
        fee_bps: 290,
        fee_fixed: 30,
        webhook_url: None,
        created_at: Utc::now(),
    }
}

fn usd() -> Vec<Currency> {
    ["USD", "EUR", "GBP"]
        .iter()
        .filter_map(|c| Currency::parse(c))
        .collect()
}

/// A create+confirm's decisions: confirm, then the PSP's charge (automatic capture).
fn decide_create_confirm(state: &PaymentState) -> PaymentState {
    let (confirmed, _) = decide(state, Input::Confirm).expect("confirm");
    let (charged, _) = decide(&confirmed, Input::Charged { amount: state.amount }).expect("charge");
    charged
}

/// The commit a captured payment's confirm leaves: the payment's update, its transition, the
/// finished attempt, the capture journal, two events and the idempotency record's answer.
fn capture_commit(payment: &Payment, i: usize) -> Commit {
    let mut p = payment.clone();
    p.state = decide_create_confirm(&p.state);
    p.version = 2;
    p.psp_reference = Some(format!("pi_{i:024}"));
    let body = serde_json::to_vec(&p.object()).unwrap();
    Commit {
        transition: Some(Transition {
            seq: 2,
            from: Some(Status::Pending),
            to: p.state.status,
            cause: "confirm".into(),
        }),
        attempt_finished: Some((AttemptId::generate(), AttemptOutcome::Succeeded)),
        journal: Some(Journal {
            kind: JournalKind::Capture,
            correlation_id: format!("att_{i:024}"),
            currency: p.currency,
            entries: postings(
                JournalKind::Capture,
                p.state.amount,
                &p.merchant_id,
                p.fee_bps,
                p.fee_fixed,
            ),
        }),
        outbox: vec![
            OutboxEvent::new("payment.authorized", &p.object()),
            OutboxEvent::new("payment.captured", &p.object()),
        ],
        idempotency: Some(IdempotencyWrite {
            merchant_id: p.merchant_id.clone(),
            key: format!("{i:064x}"),
            resource_id: Some(p.id.to_string()),
            response: Some((201, body)),
            fence: 1,
            claim: None,
        }),
        payment: Some(p),
        ..Commit::default()
    }
}

fn hot_path(c: &mut Criterion) {
    let merchant = merchant();
    let currencies = usd();
    let (payment, _) = parse_create(CREATE, &merchant, &currencies, "sandbox").expect("valid");

    c.bench_function("create request: parse and validate", |b| {
        b.iter(|| parse_create(black_box(CREATE), &merchant, &currencies, "sandbox").expect("valid"))
    });

    c.bench_function("state machine: create+confirm decisions", |b| {
        b.iter(|| decide_create_confirm(black_box(&payment.state)))
    });

    let mut charged = payment.clone();
    charged.state = decide_create_confirm(&charged.state);
    // The answer and event as the flow writes them, straight from the record; and, beside it,
    // by way of a `Value` tree (what the flow did before, and what list pages still do).
    c.bench_function("payment object: serialized directly (reply, event)", |b| {
        b.iter(|| serde_json::to_vec(&black_box(&charged).object()).unwrap())
    });
    c.bench_function("payment object: JSON tree, then serialized", |b| {
        b.iter(|| serde_json::to_vec(&black_box(&charged).to_object()).unwrap())
    });

    let commits: Vec<Commit> = (0..64).map(|i| capture_commit(&payment, i)).collect();
    let mut group = c.benchmark_group("ledger batch");
    group.throughput(Throughput::Elements(commits.len() as u64));
    group.bench_function("column arrays of 64 capture commits", |b| {
        let batch: Vec<&Commit> = commits.iter().collect();
        b.iter(|| Columns::of(black_box(&batch)).map(|_| ()).expect("columns"))
    });
    group.finish();

    let payload = br#"{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"id":"pi_000000000000000000000001","amount_received":4999}}}"#;
    let secret = "whsec_test_secret";
    c.bench_function("PSP webhook: verify a Stripe signature", |b| {
        b.iter_batched(
            || {
                let now = Utc::now().timestamp();
                (sign_stripe(payload, secret, now), now)
            },
            |(header, now)| verify_stripe(&header, payload, &[secret], 300, now).expect("valid"),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
