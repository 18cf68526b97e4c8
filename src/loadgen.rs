//! `payrail loadgen`: load against a running payrail, and docs/DESIGN.md's PostgreSQL ceiling
//! measured in the same run for comparison.
//!
//! Closed loop by default (each connection sends its next request when the last answered).
//! With `--rate`, open loop: request i is due at start + i/rate whether or not earlier ones
//! answered, and its latency counts from when it was due, so a stall shows in the percentiles
//! instead of hiding (coordinated omission corrected).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use awc::Client;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};

/// What each simulated client does for one payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// create+confirm with automatic capture: one request per payment.
    Automatic,
    /// create+confirm with manual capture, then a capture of part of it.
    Manual,
    /// manual capture, then a refund of part of the capture.
    Refunds,
    /// PSP webhooks end to end: `--events` authorized payments are made first (untimed), then
    /// each one's signed `payment_intent.succeeded` is sent; timed until every one is applied.
    Webhooks,
    /// Merchant webhooks out: a receiver in this process and `--endpoints` webhook endpoints
    /// on the merchant pointing at it, then automatic-capture payments; reports deliveries per
    /// second at the receiver and each event's commit-to-delivery time.
    WebhooksOut,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// payrail's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The merchant key to use (with --merchants 1).
    #[arg(long, default_value = "sk_test_demo")]
    pub key: String,
    /// Spread load over this many merchants (created through the operator API), chosen with a
    /// Zipf-like skew. One merchant puts every commit on one ledger shard.
    #[arg(long, default_value_t = 1)]
    pub merchants: usize,
    /// The operator token, to create merchants.
    #[arg(long, default_value = "admin_test_token")]
    pub admin_token: String,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Target payments per second (open loop); 0 runs closed loop.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, value_enum, default_value_t = Mix::Automatic)]
    pub mix: Mix,
    /// Write the JSON report here too.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// Run docs/DESIGN.md's PostgreSQL ceiling (pgbench, 32 clients) first, and print the ratio.
    #[arg(long)]
    pub compare_postgres: bool,
    /// With --mix webhooks: how many events.
    #[arg(long, default_value_t = 5_000)]
    pub events: usize,
    /// With --mix webhooks-out: webhook endpoints (each receives every event).
    #[arg(long, default_value_t = 4)]
    pub endpoints: usize,
    /// Marketplace payments: each payment is split between this many of the platform's sellers
    /// (chosen with the Zipf-like skew, distinct), with a 10 % application fee. One merchant only.
    #[arg(long, default_value_t = 0)]
    pub splits: usize,
    /// With --splits: the platform's sellers, created through the API before the load (untimed).
    #[arg(long, default_value_t = 1_000)]
    pub sellers: usize,
}

#[derive(Default)]
struct Tally {
    payments: u64,
    requests: u64,
    by_status: BTreeMap<String, u64>,
}

/// Runs the load (and the ceiling, if asked) and prints the summary; the report as JSON.
pub async fn run(args: LoadgenArgs, database_url: &str) -> Result<Value, String> {
    if args.mix == Mix::Webhooks {
        return webhooks(args, database_url).await;
    }
    let ceiling = if args.compare_postgres {
        Some(postgres_ceiling(database_url, args.duration).await?)
    } else {
        None
    };
    let client = client_for(&args);
    let keys = merchant_keys(&client, &args).await?;
    let sellers = Rc::new(sellers(&client, &args, &keys).await?);
    let receiver = if args.mix == Mix::WebhooksOut {
        Some(Receiver::start(&client, &args, &keys).await?)
    } else {
        None
    };
    let before = scrape(&client, &args.url).await;

    let hist = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let tally = Rc::new(RefCell::new(Tally::default()));
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let ticket = Rc::new(RefCell::new(0u64));
    let mut workers = Vec::new();
    for w in 0..args.connections.max(1) {
        let (client, hist, tally, ticket, keys, args, sellers) = (
            client.clone(),
            hist.clone(),
            tally.clone(),
            ticket.clone(),
            keys.clone(),
            args.clone(),
            sellers.clone(),
        );
        workers.push(actix_rt::spawn(async move {
            let mut n = 0u64;
            loop {
                // When this payment is due: now (closed loop) or on the schedule (open loop).
                let due = if let Some(gap_ns) = 1_000_000_000u64.checked_div(args.rate) {
                    let i = {
                        let mut t = ticket.borrow_mut();
                        *t += 1;
                        *t - 1
                    };
                    let due = started + Duration::from_nanos(i * gap_ns);
                    if due >= end {
                        break;
                    }
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        actix_rt::time::sleep(wait).await;
                    }
                    due
                } else {
                    Instant::now()
                };
                if Instant::now() >= end {
                    break;
                }
                n += 1;
                let key = &keys[zipf(&mut rand::thread_rng(), keys.len())];
                let ok = one_payment(
                    &client,
                    &args,
                    &sellers,
                    key,
                    &format!("lg-{}-{w}-{n}", started.elapsed().as_nanos()),
                    due,
                    &hist,
                    &tally,
                )
                .await;
                if ok {
                    tally.borrow_mut().payments += 1;
                }
            }
        }));
    }
    let progress = actix_rt::spawn({
        let tally = tally.clone();
        let total = args.duration;
        async move {
            loop {
                actix_rt::time::sleep(Duration::from_secs(1)).await;
                let secs = started.elapsed().as_secs().min(total);
                let done = (secs * 30 / total.max(1)) as usize;
                let t = tally.borrow();
                let errors: u64 = t
                    .by_status
                    .iter()
                    .filter(|(s, _)| !s.starts_with('2'))
                    .map(|(_, n)| n)
                    .sum();
                eprint!(
                    "\r[{}{}] {secs}/{total} s  {:.0} payments/s  errors {errors}   ",
                    "#".repeat(done),
                    ".".repeat(30 - done),
                    t.payments as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    });
    for w in workers {
        let _ = w.await;
    }
    progress.abort();
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let webhooks_out = match receiver {
        Some(r) => Some(r.settle(started, elapsed).await),
        None => None,
    };
    let after = scrape(&client, &args.url).await;

    let h = hist.borrow();
    let t = tally.borrow();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rate = t.payments as f64 / elapsed;
    let non_2xx: u64 = t
        .by_status
        .iter()
        .filter(|(s, _)| !s.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    let batches = batch_distribution(&before, &after);
    let mut report = json!({
        "url": args.url, "mix": format!("{:?}", args.mix).to_lowercase(), "connections": args.connections,
        "merchants": keys.len(), "splits": args.splits, "sellers": sellers.ids.len(), "duration_s": elapsed, "target_rate": args.rate, "open_loop": args.rate > 0,
        "payments": t.payments, "payments_per_s": rate, "requests": t.requests,
        "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99_9": ms(0.999), "max": h.max() as f64 / 1000.0,
                        "mean": h.mean() / 1000.0 },
        "status": t.by_status, "non_2xx": non_2xx, "ledger_batch_sizes": batches,
    });
    println!(
        "payments: {} in {elapsed:.1} s = {rate:.0} payments/s ({} requests, {non_2xx} non-2xx)",
        t.payments, t.requests
    );
    println!(
        "latency per request: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
    println!("responses by status: {:?}", t.by_status);
    if batches.as_object().is_some_and(|b| !b.is_empty()) {
        println!("ledger batch sizes during the run (bucket upper bound: batches): {batches}");
    }
    if let Some(tps) = ceiling {
        println!(
            "PostgreSQL ceiling (pgbench -c 32 -j 2, same run): {tps:.0} tps; payrail / ceiling = {:.2}x",
            rate / tps
        );
        report["postgres_ceiling_tps"] = json!(tps);
        report["ratio"] = json!(rate / tps);
    }
    if let Some(out) = webhooks_out {
        println!(
            "webhooks out: {} deliveries ({} duplicates), {:.0} deliveries/s while loading, {:.0} deliveries/s overall; commit to delivery p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            out["deliveries"], out["duplicates"], out["per_s_during_load"].as_f64().unwrap_or(0.0),
            out["per_s_overall"].as_f64().unwrap_or(0.0), out["commit_to_delivery_ms"]["p50"].as_f64().unwrap_or(0.0),
            out["commit_to_delivery_ms"]["p99"].as_f64().unwrap_or(0.0), out["commit_to_delivery_ms"]["max"].as_f64().unwrap_or(0.0),
        );
        report["webhooks_out"] = out;
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default()).map_err(|e| e.to_string())?;
    }
    Ok(report)
}

/// What the in-process receiver of `--mix webhooks-out` saw.
struct Seen {
    deliveries: u64,
    duplicates: u64,
    /// (endpoint, event id) pairs received, for duplicates.
    pairs: std::collections::HashSet<(u16, u64)>,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Microseconds from the event's commit (`created_at`) to its arrival.
    lag: Histogram<u64>,
}

/// A receiver on loopback and the endpoints that point at it.
struct Receiver {
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    /// (merchant key, endpoint id) of each endpoint made for this run, deleted at its end.
    endpoints: Vec<(String, String)>,
    client: Client,
    url: String,
}

impl Receiver {
    async fn start(client: &Client, args: &LoadgenArgs, keys: &[String]) -> Result<Receiver, String> {
        use actix_web::{web, App, HttpResponse, HttpServer};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen {
            deliveries: 0,
            duplicates: 0,
            pairs: Default::default(),
            first: None,
            last: None,
            lag: Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let shared = seen.clone();
        let server = HttpServer::new(move || {
            let seen = shared.clone();
            App::new().route(
                "/hooks/{i}",
                web::post().to(move |path: web::Path<u16>, body: web::Bytes| {
                    let seen = seen.clone();
                    async move {
                        #[derive(serde::Deserialize)]
                        struct Event<'a> {
                            id: &'a str,
                            created_at: &'a str,
                        }
                        let now = chrono::Utc::now();
                        if let Ok(e) = serde_json::from_slice::<Event>(&body) {
                            let lag = chrono::DateTime::parse_from_rfc3339(e.created_at)
                                .map(|c| (now - c.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0))
                                .unwrap_or(0);
                            let id = crate::domain::webhook::parse_event_id(e.id).unwrap_or(0) as u64;
                            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                            s.deliveries += 1;
                            if !s.pairs.insert((path.into_inner(), id)) {
                                s.duplicates += 1;
                            }
                            let at = Instant::now();
                            s.first.get_or_insert(at);
                            s.last = Some(at);
                            let _ = s.lag.record(lag.max(1) as u64);
                        }
                        HttpResponse::Ok().finish()
                    }
                }),
            )
        })
        .workers(1)
        .listen(listener)
        .map_err(|e| e.to_string())?
        .run();
        actix_rt::spawn(server);
        let mut endpoints = Vec::new();
        for key in keys {
            for i in 0..args.endpoints.max(1) {
                let body = json!({ "url": format!("http://127.0.0.1:{port}/hooks/{i}") });
                let mut r = client
                    .post(format!("{}/api/v1/webhook_endpoints", args.url))
                    .insert_header(("Authorization", format!("Bearer {key}")))
                    .insert_header(("Idempotency-Key", format!("lg-we-{port}-{i}")))
                    .send_json(&body)
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    let text = r.body().await.unwrap_or_default();
                    return Err(format!(
                        "creating a webhook endpoint: {}",
                        String::from_utf8_lossy(&text)
                    ));
                }
                let made: Value = r.json().await.map_err(|e| e.to_string())?;
                endpoints.push((key.clone(), made["id"].as_str().unwrap_or_default().to_owned()));
            }
        }
        eprintln!(
            "receiver on 127.0.0.1:{port}, {} endpoint(s) per merchant",
            args.endpoints.max(1)
        );
        Ok(Receiver {
            seen,
            endpoints,
            client: client.clone(),
            url: args.url.clone(),
        })
    }

    /// Waits until no delivery has come for 3 s (at most 120 s), then sums up.
    async fn settle(self, started: Instant, load_secs: f64) -> Value {
        let load_end = started + Duration::from_secs_f64(load_secs);
        let mut quiet_since = Instant::now();
        let mut count = self.seen.lock().unwrap_or_else(|p| p.into_inner()).deliveries;
        // Called as the load ends: what arrived so far arrived while loading.
        let during_load = count;
        while quiet_since.elapsed() < Duration::from_secs(3) && load_end.elapsed() < Duration::from_secs(120) {
            actix_rt::time::sleep(Duration::from_millis(200)).await;
            let now = self.seen.lock().unwrap_or_else(|p| p.into_inner()).deliveries;
            if now != count {
                count = now;
                quiet_since = Instant::now();
            }
        }
        // The run's endpoints go with it: the next run must not deliver to a dead receiver.
        for (key, id) in &self.endpoints {
            let _ = self
                .client
                .delete(format!("{}/api/v1/webhook_endpoints/{id}", self.url))
                .insert_header(("Authorization", format!("Bearer {key}")))
                .send()
                .await;
        }
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let span = match (s.first, s.last) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let ms = |q: f64| s.lag.value_at_quantile(q) as f64 / 1000.0;
        json!({
            "deliveries": s.deliveries,
            "duplicates": s.duplicates,
            "per_s_overall": if span > 0.0 { s.deliveries as f64 / span } else { 0.0 },
            "per_s_during_load": during_load as f64 / load_secs.max(0.001),
            "drained_after_load_s": s.last.map(|l| l.saturating_duration_since(load_end).as_secs_f64()).unwrap_or(0.0),
            "commit_to_delivery_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": s.lag.max() as f64 / 1000.0 },
        })
    }
}

/// An HTTP/1.1 client allowed `--connections` connections (awc's default cap is 100).
fn client_for(args: &LoadgenArgs) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .max_http_version(awc::http::Version::HTTP_11)
        .connector(awc::Connector::new().limit(args.connections.max(1)))
        .finish()
}

/// One payment's requests; records each request's latency from `due`. True if all were 2xx.
#[allow(clippy::too_many_arguments)]
async fn one_payment(
    client: &Client,
    args: &LoadgenArgs,
    sellers: &Sellers,
    key: &str,
    idem: &str,
    due: Instant,
    hist: &RefCell<Histogram<u64>>,
    tally: &RefCell<Tally>,
) -> bool {
    let amount = rand::thread_rng().gen_range(100..100_000);
    let capture = if matches!(args.mix, Mix::Automatic | Mix::WebhooksOut) {
        "automatic"
    } else {
        "manual"
    };
    let mut body = json!({ "order_id": "ord_loadgen", "amount": { "value": amount, "currency": "USD" },
                           "payment_method": "pm_card_visa", "capture_strategy": capture, "confirm": true });
    if !sellers.ids.is_empty() && args.splits > 0 {
        split(&mut body, amount, args.splits, sellers);
    }
    let Some(p) = post(client, args, key, "/api/v1/payments", idem, &body, due, hist, tally).await else {
        return false;
    };
    if matches!(args.mix, Mix::Automatic | Mix::WebhooksOut) {
        return true;
    }
    let id = p["payment_id"].as_str().unwrap_or_default().to_owned();
    let part = json!({ "amount": { "value": amount / 2 + 1, "currency": "USD" } });
    let now = Instant::now();
    if post(
        client,
        args,
        key,
        &format!("/api/v1/payments/{id}/capture"),
        &format!("{idem}-c"),
        &part,
        now,
        hist,
        tally,
    )
    .await
    .is_none()
    {
        return false;
    }
    if args.mix == Mix::Refunds {
        let refund = json!({ "amount": { "value": amount / 4 + 1, "currency": "USD" } });
        let now = Instant::now();
        return post(
            client,
            args,
            key,
            &format!("/api/v1/payments/{id}/refunds"),
            &format!("{idem}-r"),
            &refund,
            now,
            hist,
            tally,
        )
        .await
        .is_some();
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn post(
    client: &Client,
    args: &LoadgenArgs,
    key: &str,
    path: &str,
    idem: &str,
    body: &Value,
    since: Instant,
    hist: &RefCell<Histogram<u64>>,
    tally: &RefCell<Tally>,
) -> Option<Value> {
    let sent = client
        .post(format!("{}{path}", args.url))
        .insert_header(("Authorization", format!("Bearer {key}")))
        .insert_header(("Idempotency-Key", idem))
        .send_json(body)
        .await;
    let micros = since.elapsed().as_micros() as u64;
    let _ = hist.borrow_mut().record(micros.max(1));
    let status = match &sent {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(_) => "connection_error".to_owned(),
    };
    {
        let mut t = tally.borrow_mut();
        t.requests += 1;
        *t.by_status.entry(status).or_default() += 1;
    }
    let mut resp = sent.ok()?;
    let ok = resp.status().is_success();
    let bytes = resp.body().await.ok()?;
    ok.then(|| serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Webhooks end to end: HTTP → signature → JetStream → consumer → payment actor → commit.
async fn webhooks(args: LoadgenArgs, database_url: &str) -> Result<Value, String> {
    let config_secret = std::env::var("PAYRAIL__WEBHOOKS__SECRET").ok();
    let secret = match config_secret {
        Some(s) => s,
        None => {
            crate::config::Config::load(std::path::Path::new("config.toml"))
                .map_err(|e| e.to_string())?
                .webhooks
                .secret
        }
    };
    let client = client_for(&args);
    // 1. Authorized payments to capture by event (untimed).
    eprintln!("creating {} authorized payments …", args.events);
    let intents = Rc::new(RefCell::new(Vec::with_capacity(args.events)));
    let next = Rc::new(RefCell::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (client, args, intents, next) = (client.clone(), args.clone(), intents.clone(), next.clone());
        workers.push(actix_rt::spawn(async move {
            loop {
                let i = {
                    let mut n = next.borrow_mut();
                    *n += 1;
                    *n - 1
                };
                if i >= args.events {
                    break;
                }
                let body = json!({ "order_id": format!("wh_{i}"), "amount": { "value": 1000, "currency": "USD" },
                                   "payment_method": "pm_card_visa", "capture_strategy": "manual", "confirm": true });
                let sent = client
                    .post(format!("{}/api/v1/payments", args.url))
                    .insert_header(("Authorization", format!("Bearer {}", args.key)))
                    .insert_header(("Idempotency-Key", format!("wh-{}-{i}", std::process::id())))
                    .send_json(&body)
                    .await;
                if let Ok(mut r) = sent {
                    if let Ok(p) = r.json::<Value>().await {
                        if let Some(pi) = p["psp_reference"].as_str() {
                            intents.borrow_mut().push(pi.to_owned());
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let intents: Vec<String> = intents.borrow().clone();
    let run_id = format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis());

    // 2. Their events, as fast as the connections allow (timed).
    eprintln!("sending {} payment_intent.succeeded events …", intents.len());
    let hist = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let statuses: Rc<RefCell<BTreeMap<String, u64>>> = Rc::new(RefCell::new(BTreeMap::new()));
    let queue = Rc::new(RefCell::new(intents.clone()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (client, args, hist, statuses, queue, secret, run_id) = (
            client.clone(),
            args.clone(),
            hist.clone(),
            statuses.clone(),
            queue.clone(),
            secret.clone(),
            run_id.clone(),
        );
        workers.push(actix_rt::spawn(async move {
            loop {
                let Some(pi) = queue.borrow_mut().pop() else { break };
                let sent_ms = chrono::Utc::now().timestamp_millis();
                let body = json!({ "id": format!("evt_lg_{run_id}_{pi}"), "object": "event", "type": "payment_intent.succeeded",
                                   "created": sent_ms / 1000,
                                   "data": { "object": { "id": pi, "object": "payment_intent", "amount": 1000,
                                                         "amount_received": 1000, "metadata": { "sent_ms": sent_ms } } } })
                .to_string();
                let signature = crate::adapters::psp::signature::sign_stripe(body.as_bytes(), &secret, sent_ms / 1000);
                let t = Instant::now();
                let sent = client
                    .post(format!("{}/internal/webhooks/psp/sandbox", args.url))
                    .insert_header(("Stripe-Signature", signature))
                    .send_body(body)
                    .await;
                let _ = hist.borrow_mut().record((t.elapsed().as_micros() as u64).max(1));
                let status = sent.map(|r| r.status().as_u16().to_string()).unwrap_or_else(|_| "connection_error".into());
                *statuses.borrow_mut().entry(status).or_default() += 1;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let accepted_after = started.elapsed().as_secs_f64();

    // 3. Until every event is applied (bounded wait), then latencies from PostgreSQL.
    let pg: tokio_postgres::Config = database_url.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    let (db, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(pg_text)?;
    actix_rt::spawn(conn);
    let pattern = format!("evt_lg_{run_id}_%");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut applied: i64 = 0;
    while Instant::now() < deadline {
        applied = db
            .query_one(
                "SELECT count(*) FROM processed_events WHERE event_id LIKE $1",
                &[&pattern],
            )
            .await
            .map_err(pg_text)?
            .get(0);
        if applied as usize >= intents.len() {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let row = db
        .query_one(
            "SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY
                 extract(epoch FROM processed_at) * 1000 - (convert_from(raw, 'UTF8')::jsonb #>> '{data,object,metadata,sent_ms}')::float8)
             FROM processed_events WHERE event_id LIKE $1",
            &[&pattern],
        )
        .await
        .map_err(pg_text)?;
    let e2e: Vec<f64> = row.get::<_, Option<Vec<f64>>>(0).unwrap_or_default();
    let h = hist.borrow();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rate = applied as f64 / elapsed;
    println!("events: {applied} of {} applied in {elapsed:.1} s = {rate:.0} events/s end to end (all accepted after {accepted_after:.1} s)", intents.len());
    println!(
        "webhook HTTP answer: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    if e2e.len() == 3 {
        println!(
            "sent → committed: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms",
            e2e[0], e2e[1], e2e[2]
        );
    }
    println!("responses by status: {:?}", statuses.borrow());
    let report = json!({ "mix": "webhooks", "events": intents.len(), "applied": applied, "duration_s": elapsed,
                         "events_per_s": rate, "http_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99) },
                         "end_to_end_ms": e2e, "status": *statuses.borrow() });
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default()).map_err(|e| e.to_string())?;
    }
    Ok(report)
}

/// Merchant k of n is chosen with weight 1/(k+1).
fn pg_text(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("PostgreSQL: {}", d.message()),
        None => format!("PostgreSQL: {e}"),
    }
}

pub fn zipf(rng: &mut impl Rng, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let total: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
    let mut x = rng.gen::<f64>() * total;
    for k in 0..n {
        x -= 1.0 / (k + 1) as f64;
        if x <= 0.0 {
            return k;
        }
    }
    n - 1
}

/// The platform's sellers, and the cumulative Zipf weights to draw them by (drawn in
/// O(log n), however many there are).
#[derive(Default)]
pub struct Sellers {
    ids: Vec<String>,
    cdf: Vec<f64>,
}

impl Sellers {
    fn new(ids: Vec<String>) -> Sellers {
        let mut total = 0.0;
        let cdf = (1..=ids.len())
            .map(|k| {
                total += 1.0 / k as f64;
                total
            })
            .collect();
        Sellers { ids, cdf }
    }

    fn draw(&self, rng: &mut impl Rng) -> usize {
        let x = rng.gen::<f64>() * self.cdf.last().copied().unwrap_or(0.0);
        self.cdf
            .partition_point(|c| *c < x)
            .min(self.ids.len().saturating_sub(1))
    }
}

/// `n` distinct sellers (Zipf-skewed: a few sell a lot) sharing 80 % of `amount`; a 10 %
/// application fee; the rest is the platform's.
fn split(body: &mut Value, amount: i64, n: usize, sellers: &Sellers) {
    let mut rng = rand::thread_rng();
    let n = n.min(sellers.ids.len());
    let mut picked: Vec<usize> = Vec::with_capacity(n);
    // Distinct draws, a bounded number of tries; then the first sellers not drawn yet.
    for _ in 0..n * 64 {
        if picked.len() == n {
            break;
        }
        let s = sellers.draw(&mut rng);
        if !picked.contains(&s) {
            picked.push(s);
        }
    }
    for s in 0..sellers.ids.len() {
        if picked.len() == n {
            break;
        }
        if !picked.contains(&s) {
            picked.push(s);
        }
    }
    let each = amount * 80 / 100 / n.max(1) as i64;
    if each > 0 {
        body["splits"] = Value::Array(
            picked
                .iter()
                .map(|s| json!({ "account": sellers.ids[*s], "amount": each }))
                .collect(),
        );
    }
    body["application_fee_amount"] = json!(amount / 10);
}

/// With `--splits`: the platform's sellers, made before the load (untimed), `--connections`
/// at a time.
async fn sellers(client: &Client, args: &LoadgenArgs, keys: &[String]) -> Result<Sellers, String> {
    if args.splits == 0 {
        return Ok(Sellers::default());
    }
    if keys.len() != 1 {
        return Err("--splits needs one merchant (the platform)".into());
    }
    if args.splits > 100 {
        return Err("--splits: a payment has at most 100 splits".into());
    }
    let mut out = Vec::with_capacity(args.sellers);
    let started = Instant::now();
    let ids: Vec<usize> = (0..args.sellers.max(args.splits)).collect();
    for chunk in ids.chunks(args.connections.max(1)) {
        let made = futures_util::future::join_all(chunk.iter().map(|i| async move {
            let mut resp = client
                .post(format!("{}/api/v1/accounts", args.url))
                .insert_header(("Authorization", format!("Bearer {}", keys[0])))
                .insert_header(("Idempotency-Key", format!("loadgen-seller-{i}")))
                .send_json(&json!({ "name": format!("seller {i}"), "country": "FR", "default_currency": "USD" }))
                .await
                .map_err(|e| format!("creating sellers: {e}"))?;
            let body: Value = resp.json().await.map_err(|e| format!("creating sellers: {e}"))?;
            body["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or(format!("creating sellers: {body}"))
        }))
        .await;
        for m in made {
            out.push(m?);
        }
    }
    eprintln!(
        "{} sellers ready in {:.1} s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(Sellers::new(out))
}

async fn merchant_keys(client: &Client, args: &LoadgenArgs) -> Result<Vec<String>, String> {
    if args.merchants <= 1 {
        return Ok(vec![args.key.clone()]);
    }
    let mut keys = Vec::new();
    for i in 0..args.merchants {
        let mut resp = client
            .post(format!("{}/admin/v1/merchants", args.url))
            .insert_header(("Authorization", format!("Bearer {}", args.admin_token)))
            .send_json(&json!({ "name": format!("loadgen merchant {i}"), "default_currency": "USD" }))
            .await
            .map_err(|e| format!("creating merchants: {e}"))?;
        let body: Value = resp.json().await.map_err(|e| format!("creating merchants: {e}"))?;
        keys.push(
            body["api_key"]
                .as_str()
                .ok_or(format!("creating merchants: {body}"))?
                .to_owned(),
        );
    }
    Ok(keys)
}

/// payrail_ledger_batch_size_bucket counts from /metrics.
async fn scrape(client: &Client, url: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(mut resp) = client.get(format!("{url}/metrics")).send().await else {
        return out;
    };
    let Ok(body) = resp.body().limit(1 << 20).await else {
        return out;
    };
    for line in String::from_utf8_lossy(&body).lines() {
        if let Some(rest) = line.strip_prefix("payrail_ledger_batch_size_bucket{le=\"") {
            if let Some((le, n)) = rest.split_once("\"} ") {
                out.insert(le.to_owned(), n.trim().parse().unwrap_or(0));
            }
        }
    }
    out
}

/// Batches per size bucket during the run, from the cumulative buckets before and after.
fn batch_distribution(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Value {
    let mut bounds: Vec<(u64, u64)> = after
        .iter()
        .filter_map(|(le, n)| {
            le.parse::<f64>()
                .ok()
                .filter(|b| b.is_finite())
                .map(|b| (b as u64, n - before.get(le).copied().unwrap_or(0)))
        })
        .collect();
    bounds.sort();
    let mut out = serde_json::Map::new();
    let mut previous = 0;
    for (bound, cumulative) in bounds {
        if cumulative > previous {
            out.insert(format!("<={bound}"), json!(cumulative - previous));
        }
        previous = cumulative;
    }
    Value::Object(out)
}

/// docs/DESIGN.md's ceiling: pgbench, 32 clients, -j 2, on the shipped script, in a scratch database.
async fn postgres_ceiling(database_url: &str, secs: u64) -> Result<f64, String> {
    let pg: tokio_postgres::Config = database_url.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let mut admin = pg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    actix_rt::spawn(conn);
    client
        .batch_execute("DROP DATABASE IF EXISTS payrail_ceiling")
        .await
        .map_err(|e| e.to_string())?;
    client
        .batch_execute("CREATE DATABASE payrail_ceiling")
        .await
        .map_err(|e| e.to_string())?;
    let mut scratch = pg.clone();
    scratch.dbname("payrail_ceiling");
    let (db, conn) = scratch
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    actix_rt::spawn(conn);
    db.batch_execute(include_str!("../scripts/bench/ceiling_schema.sql"))
        .await
        .map_err(|e| e.to_string())?;
    let script = std::env::temp_dir().join(format!("payrail-ceiling-{}.sql", std::process::id()));
    std::fs::write(&script, include_str!("../scripts/bench/ceiling.sql")).map_err(|e| e.to_string())?;
    eprintln!("PostgreSQL ceiling: pgbench -c 32 -j 2 -T {secs} …");
    let out = std::process::Command::new("pgbench")
        .args([
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            &user,
            "-n",
            "-c",
            "32",
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg("payrail_ceiling")
        .output()
        .map_err(|e| format!("pgbench: {e} (install postgresql-client)"))?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .ok_or_else(|| format!("pgbench gave no tps: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_the_first_merchants() {
        let mut rng = rand::thread_rng();
        let mut seen = [0u32; 8];
        for _ in 0..8000 {
            seen[zipf(&mut rng, 8)] += 1;
        }
        assert!(seen[0] > seen[1] && seen[1] > seen[7] && seen[7] > 0, "{seen:?}");
    }

    #[test]
    fn sellers_are_drawn_with_the_same_skew_and_never_out_of_range() {
        let mut rng = rand::thread_rng();
        let sellers = Sellers::new((0..8).map(|i| format!("acct_{i}")).collect());
        let mut seen = [0u32; 8];
        for _ in 0..8000 {
            seen[sellers.draw(&mut rng)] += 1;
        }
        assert!(seen[0] > seen[1] && seen[1] > seen[7] && seen[7] > 0, "{seen:?}");
        // The exact shares of 1/k: the first about 37 % of draws.
        assert!((2600..3300).contains(&seen[0]), "{seen:?}");
        let mut body = json!({});
        split(&mut body, 10_000, 5, &sellers);
        let splits = body["splits"].as_array().unwrap();
        let mut ids: Vec<&str> = splits.iter().map(|s| s["account"].as_str().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        assert_eq!(splits.iter().map(|s| s["amount"].as_i64().unwrap()).sum::<i64>(), 8_000);
        assert_eq!(body["application_fee_amount"], 1_000);
    }

    #[test]
    fn batch_distribution_is_the_difference_of_cumulative_buckets() {
        let before: BTreeMap<String, u64> = [("1", 2), ("3", 2), ("7", 5), ("+Inf", 5)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let after: BTreeMap<String, u64> = [("1", 2), ("3", 10), ("7", 20), ("+Inf", 20)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(batch_distribution(&before, &after), json!({ "<=3": 8, "<=7": 7 }));
    }
}
