//! What routing costs an authorization: the decision `Directory::route` makes once a merchant's
//! connectors and rules are cached (the eligible connectors for the payment's currency, its
//! facts, the first matching rule, the fallbacks), with one rule and with ten, for payments that
//! match the first rule, the last one, or none (the default list). 100,000 decisions each.
//! Target: p99 under 50 µs. `cargo bench --bench routing`.

use std::time::Instant;

use hdrhistogram::Histogram;
use payrail::domain::ids::stable_hash;
use payrail::domain::record::Metadata;
use payrail::domain::risk::CardSignals;
use payrail::domain::routing::{Facts, RoutingRules};
use payrail::domain::{Currency, PaymentId};

/// A merchant's connectors as the cache holds them: (id, enabled, currencies).
fn connectors() -> Vec<(String, bool, Vec<String>)> {
    (0..8)
        .map(|i| {
            let currencies = if i % 3 == 0 {
                vec![]
            } else {
                vec!["USD".to_string(), "EUR".to_string()]
            };
            (format!("mca_connector_{i}"), i != 5, currencies)
        })
        .collect()
}

fn rules(n: usize) -> RoutingRules {
    let mut rules = Vec::new();
    for i in 0..n {
        let r = match i % 5 {
            0 => {
                serde_json::json!({ "name": format!("r{i}"), "when": { "currency": ["GBP", "CHF"], "amount_gte": 100000 }, "connector": "mca_connector_1" })
            }
            1 => {
                serde_json::json!({ "name": format!("r{i}"), "when": { "card_brand": ["amex"], "card_country": ["JP", "SG"] }, "connector": "mca_connector_2" })
            }
            2 => {
                serde_json::json!({ "name": format!("r{i}"), "when": { "bin": { "from": "510000", "to": "559999" } }, "connector": "mca_connector_3" })
            }
            3 => {
                serde_json::json!({ "name": format!("r{i}"), "when": { "metadata": { "flow": "b2b", "tier": "gold" } }, "connector": "mca_connector_4" })
            }
            _ => serde_json::json!({ "name": format!("r{i}"), "when": { "amount_lt": 50 },
                                      "split": [ { "connector": "mca_connector_6", "weight": 70 }, { "connector": "mca_connector_7", "weight": 30 } ] }),
        };
        rules.push(r);
    }
    // The last rule matches the benchmark's "last" payments: a USD visa with metadata vip.
    rules.push(serde_json::json!({ "name": "last", "when": { "currency": ["USD"], "metadata": { "tier": "vip" } },
                                   "split": [ { "connector": "mca_connector_0", "weight": 1 }, { "connector": "mca_connector_1", "weight": 1 } ] }));
    serde_json::from_value(
        serde_json::json!({ "rules": rules, "default": ["mca_connector_0", "mca_connector_2", "mca_connector_3"] }),
    )
    .unwrap()
}

fn run(label: &str, rules: &RoutingRules, metadata: &Metadata) -> u64 {
    let connectors = connectors();
    let usd = Currency::parse("USD").unwrap();
    let card = CardSignals {
        fingerprint: "4f1c2a9d8e7b6a5c".into(),
        bin: "424242".into(),
        brand: "visa".into(),
        country: "US".into(),
        funding: "credit".into(),
        last4: "4242".into(),
    };
    let ids: Vec<PaymentId> = (0..1_000).map(|_| PaymentId::generate()).collect();
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut chosen = 0usize;
    for i in 0..100_000 {
        let id = &ids[i % ids.len()];
        let t = Instant::now();
        // As Directory::route does it.
        let eligible: Vec<&str> = connectors
            .iter()
            .filter(|(_, enabled, cur)| *enabled && (cur.is_empty() || cur.iter().any(|c| c == usd.code())))
            .map(|(id, _, _)| id.as_str())
            .collect();
        let facts = Facts {
            currency: usd,
            amount: 4_200,
            card: Some(&card),
            metadata,
            key: stable_hash(id.as_str()),
        };
        let d = rules.route(&facts, &eligible).expect("a decision");
        h.record(t.elapsed().as_nanos() as u64).unwrap();
        chosen += d.connectors.len();
    }
    println!(
        "routing, {label}: 100,000 decisions: p50 {:.2} µs, p99 {:.2} µs, max {:.1} µs ({} connectors listed on average)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        chosen / 100_000
    );
    h.value_at_quantile(0.99)
}

fn main() {
    let none = Metadata::default();
    let vip: Metadata = [("tier".to_string(), "vip".to_string())].into();
    let one = RoutingRules {
        rules: rules(0).rules,
        default: rules(0).default,
    };
    let ten = rules(9);
    let mut worst = 0;
    worst = worst.max(run("1 rule, it matches", &one, &vip));
    worst = worst.max(run("1 rule, default", &one, &none));
    worst = worst.max(run("10 rules, the last matches", &ten, &vip));
    worst = worst.max(run("10 rules, default", &ten, &none));
    assert!(worst < 50_000, "p99 over 50 µs");
}
