//! Memory of live payment actors: resident set before and after activating 100,000 of them
//! (each with a payment's full state), and after they passivate. Run: `cargo bench --bench
//! actor_memory` (needs PostgreSQL and NATS as for `payrail serve`; the actors are started with
//! their state in hand, so the count measures actors, not database reads).

use std::sync::Arc;
use std::time::{Duration, Instant};

use payrail::actors::error::PaymentError;
use payrail::actors::ledger_shard::Ledger;
use payrail::actors::payment_flow::{Live, PaymentDeps};
use payrail::actors::store::{PgStore, SystemClock};
use payrail::actors::{Op, PaymentCall, PaymentRegistry};
use payrail::adapters::postgres::Db;
use payrail::adapters::psp::sandbox::SandboxPsp;
use payrail::config::{repo_config_path, Config};
use payrail::domain::record::now;
use payrail::domain::{CaptureStrategy, Currency, MerchantId, Money, Payment, PaymentId};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn payment(merchant: &MerchantId, i: usize) -> Payment {
    let at = now();
    Payment {
        order_id: format!("ord_{i}"),
        capture_strategy: CaptureStrategy::Manual,
        psp_reference: Some(format!("pi_{i:024}")),
        customer_id: Some("cus_42".into()),
        description: Some("2 items".into()),
        metadata: [("cart_id".to_owned(), "cart_abc".to_owned())].into(),
        fee_bps: 290,
        fee_fixed: 30,
        ..Payment::pending(
            PaymentId::generate(),
            merchant.clone(),
            Money::new(4999, Currency::parse("USD").unwrap()),
            "pm_card_visa".into(),
            "sandbox".into(),
            at,
        )
    }
}

#[actix_web::main]
async fn main() {
    let count: usize = std::env::var("ACTORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut config = Config::load(std::path::Path::new(repo_config_path())).unwrap();
    let base = config.database.url.rsplit_once('/').unwrap().0.to_owned();
    config.database.url = format!("{base}/payrail_bench_actors");
    config.actors.idle_timeout_ms = 8_000;
    config.actors.max_live = count + 1;
    let db = Db::connect(&config.database).await.expect("PostgreSQL");
    db.migrate().await.expect("migrations");
    let metrics = Arc::new(payrail::metrics::Metrics::default());
    let ledger = Arc::new(Ledger::start(&db, &config.ledger, metrics.clone()));
    let psp = Arc::new(SandboxPsp::new(
        db.clone(),
        config.psp.sandbox.clone(),
        config.server.public_url.clone(),
        None,
    ));
    let deps = PaymentDeps {
        store: Arc::new(PgStore {
            db,
            ledger,
            leases: None,
        }),
        connectors: Arc::new(payrail::adapters::psp::connector::OneConnector::new(psp.clone())),
        psp,
        psp_timeout: Some(Duration::from_secs(5)),
        clock: Arc::new(SystemClock),
        risk: Arc::new(payrail::actors::risk::NoRisk),
        metrics,
        landing: Default::default(),
    };
    let registry = Arc::new(PaymentRegistry::new(deps, config.actors.clone()));
    registry.spawn_passivation();
    let merchant = MerchantId::parse("mer_bench").unwrap();

    let before = rss_bytes();
    let started = Instant::now();
    activate(&registry, &merchant, count).await;
    let live = registry.live();
    let after = rss_bytes();
    let per_actor = (after.saturating_sub(before)) as f64 / live as f64;
    println!(
        "{live} live payment actors in {:.1} s: RSS {:.1} MiB -> {:.1} MiB, {per_actor:.0} bytes per live actor",
        started.elapsed().as_secs_f64(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    passivate(&registry).await;
    // The allocator keeps what the passivated actors freed; a second wave must reuse it.
    activate(&registry, &merchant, count).await;
    println!(
        "a second wave of {} live actors: RSS {:.1} MiB (no growth = the first wave's memory was freed and reused)",
        registry.live(),
        rss_bytes() as f64 / 1048576.0
    );
    passivate(&registry).await;
}

async fn passivate(registry: &PaymentRegistry) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.live() > 0 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "after passivation ([actors] idle_timeout_ms = 8000): {} live, RSS {:.1} MiB",
        registry.live(),
        rss_bytes() as f64 / 1048576.0
    );
}

async fn activate(registry: &Arc<PaymentRegistry>, merchant: &MerchantId, count: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(2_000) {
        let calls = chunk.iter().map(|i| {
            let (registry, merchant) = (registry.clone(), merchant.clone());
            let p = payment(&merchant, *i);
            async move {
                let id = p.id.clone();
                // An operation the state machine refuses for a pending payment, answered from
                // memory: the actor is started and stays live, and nothing is read or written.
                // (`Resolve` starts from the store, where these payments are not.)
                let call = PaymentCall::new(merchant, Op::Approve, None);
                let live = Some(Live {
                    payment: p,
                    open: vec![],
                });
                if let Err(e) = registry.call_with(&id, live, call).await {
                    assert!(
                        matches!(e, PaymentError::Rejected { .. }),
                        "the actor answers from memory: {e}"
                    );
                }
            }
        });
        futures_util::future::join_all(calls).await;
    }
}
