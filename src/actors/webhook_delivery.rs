//! Merchant webhook delivery (docs/DESIGN.md, "Merchant webhooks"). On a thread of its own:
//!
//! - the **dispatcher** pulls committed events from JetStream (durable consumer
//!   `{prefix}_webhooks_out`), stores one pending delivery per interested endpoint in
//!   PostgreSQL, and only then acknowledges the events; it hands the new deliveries to
//! - one **endpoint worker** per endpoint (an actor with a bounded mailbox and a bounded number of
//!   POSTs in flight), which signs and POSTs, and sends each attempt's outcome to
//! - the **recorder**, which writes outcomes in batches: the delivery log, the next retry
//!   (exponential backoff with jitter, for the retry window), and endpoint health;
//! - the **poller** claims deliveries whose time has come from PostgreSQL: retries, and
//!   deliveries whose lease ran out (their node died, or a mailbox had no room).
//!
//! Every delivery is leased in PostgreSQL while a node holds it, so none is lost to a crash of
//! payrail, NATS or the endpoint, and memory stays bounded: what does not fit in a mailbox
//! waits in PostgreSQL. At least once: a crash between a 2xx and its record sends it again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio::sync::{mpsc, Semaphore};

use super::mailbox::ActorStats;
use crate::adapters::http_out::WebhookClient;
use crate::adapters::nats::Nats;
use crate::adapters::postgres::webhooks_out::{Attempt, EndpointRow};
use crate::adapters::postgres::{Db, StoreError};
use crate::config::WebhooksOutConfig;
use crate::domain::webhook::{parse_event_id, retry_delay, signature_header, wants};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How long JetStream waits for the dispatcher's ack before it sends a batch again.
const CONSUMER_ACK_WAIT: Duration = Duration::from_secs(30);
/// When a delivery a mailbox had no room for is due again.
const NO_ROOM_DELAY: Duration = Duration::from_secs(1);
/// POSTs in flight over all endpoints at most.
const MAX_IN_FLIGHT_TOTAL: usize = 1_024;
/// Outcomes waiting for the recorder at most; past that, workers wait (back-pressure).
const OUTCOME_QUEUE: usize = 10_000;
/// Outcomes written per transaction at most.
const RECORD_BATCH: usize = 1_000;
/// An endpoint worker with nothing to do leaves memory after this long.
const WORKER_IDLE: Duration = Duration::from_secs(60);
/// How long a merchant's endpoints are cached on a node that did not change them.
const CACHE_TTL: Duration = Duration::from_secs(5);
const MAX_CACHED_MERCHANTS: usize = 100_000;
/// Events deleted per pruning round, and how often pruning runs.
const PRUNE_BATCH: i64 = 10_000;
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Held deliveries whose leases one statement renews.
const RENEW_CHUNK: usize = 5_000;

/// One merchant's enabled endpoints.
pub type Endpoints = Arc<Vec<Arc<EndpointRow>>>;

/// Merchants' enabled endpoints, shared by the delivery thread and the API (which forgets a
/// merchant's entry when it changes one).
#[derive(Default)]
pub struct EndpointCache {
    map: DashMap<String, (Instant, Endpoints)>,
    /// Bumped by every invalidation: a read that began before one must not put what it read
    /// back (it may predate the change, and would hide it for the whole TTL).
    generation: std::sync::atomic::AtomicU64,
}

impl EndpointCache {
    pub fn invalidate(&self, merchant: &str) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.map.remove(merchant);
    }

    async fn get(&self, db: &Db, merchant: &str) -> Result<Endpoints, StoreError> {
        if let Some(e) = self.map.get(merchant) {
            if e.0.elapsed() < CACHE_TTL {
                return Ok(e.1.clone());
            }
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let rows = db.endpoints(merchant).await?;
        let enabled: Endpoints = Arc::new(
            rows.into_iter()
                .filter(|e| e.status == "enabled")
                .map(Arc::new)
                .collect(),
        );
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
            // Changed while it was read: used this once, not kept.
            return Ok(enabled);
        }
        if self.map.len() >= MAX_CACHED_MERCHANTS {
            self.map.clear();
        }
        self.map.insert(merchant.to_owned(), (Instant::now(), enabled.clone()));
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
            // An invalidation between the check and the insert: take the entry back out.
            self.map.remove(merchant);
        }
        Ok(enabled)
    }
}

/// What the rest of payrail holds of webhook delivery.
pub struct WebhookDelivery {
    /// The `webhook_endpoint` actor kind: live workers, and deliveries in their mailboxes.
    pub stats: Arc<ActorStats>,
    pub cache: Arc<EndpointCache>,
}

impl WebhookDelivery {
    /// The handle without the loops (`[webhooks_out] enabled = false`): the API still
    /// invalidates its cache.
    pub fn idle() -> WebhookDelivery {
        WebhookDelivery {
            stats: Arc::new(ActorStats::default()),
            cache: Arc::new(EndpointCache::default()),
        }
    }

    /// Starts the dispatcher, poller and recorder on a thread of their own. The durable
    /// consumer is made first, before payrail serves, so that no event committed from then on
    /// can pass before it.
    pub async fn start(
        db: Db,
        nats: Nats,
        config: WebhooksOutConfig,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<WebhookDelivery, crate::adapters::nats::NatsError> {
        nats.webhooks_consumer(CONSUMER_ACK_WAIT).await?;
        let handle = WebhookDelivery::idle();
        let (stats, cache) = (handle.stats.clone(), handle.cache.clone());
        let arbiter = actix::Arbiter::new();
        arbiter.spawn_fn(move || {
            let (outcomes, outcome_rx) = mpsc::channel(OUTCOME_QUEUE);
            let connections = (config.max_in_flight_per_endpoint * 64).clamp(64, 4096);
            let shared = Rc::new(Shared {
                client: WebhookClient::new(
                    config.allow_private_targets,
                    Duration::from_millis(config.timeout_ms),
                    connections,
                ),
                db,
                config,
                metrics,
                stats,
                cache,
                workers: RefCell::new(HashMap::new()),
                held: RefCell::new(HashMap::new()),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_TOTAL)),
                outcomes,
                shutdown,
            });
            actix_rt::spawn(record(shared.clone(), outcome_rx));
            actix_rt::spawn(poll(shared.clone()));
            actix_rt::spawn(dispatch(shared, nats));
        });
        Ok(handle)
    }
}

/// One delivery in a worker's mailbox.
struct Job {
    delivery_id: i64,
    endpoint: Arc<EndpointRow>,
    body: Bytes,
    /// Attempts made before this one.
    attempts: i32,
    retry_until: DateTime<Utc>,
    event_created: Option<DateTime<Utc>>,
}

/// What this node knows of a delivery it holds: the lease it renews is that of this claim only.
#[derive(Clone, Copy)]
struct Held {
    retry_until: DateTime<Utc>,
    attempts: i32,
}

struct Shared {
    db: Db,
    config: WebhooksOutConfig,
    metrics: Arc<Metrics>,
    stats: Arc<ActorStats>,
    cache: Arc<EndpointCache>,
    client: WebhookClient,
    workers: RefCell<HashMap<String, mpsc::Sender<Job>>>,
    /// Deliveries this node holds (in a mailbox or in flight), with the retry window they were
    /// claimed in and the attempts made before: a claim that finds one of them again in the same
    /// window does not queue it twice; in a new window (a redelivery asked for meanwhile) it is
    /// queued again. The poller renews their leases ([`renew_leases`]), so that no other node
    /// takes what waits here in a long queue.
    held: RefCell<HashMap<i64, Held>>,
    /// POSTs in flight over all endpoints.
    in_flight: Arc<Semaphore>,
    outcomes: mpsc::Sender<Attempt>,
    shutdown: Shutdown,
}

impl Shared {
    fn lease(&self) -> Duration {
        Duration::from_secs(self.config.claim_lease_secs)
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.retry_window_secs)
    }

    /// Room left in all mailboxes (`stats.mailbox_depth` counts what they hold).
    fn room(&self) -> usize {
        let queued = usize::try_from(self.stats.depth()).unwrap_or(0);
        self.config.max_queued_total.saturating_sub(queued)
    }

    /// This node's endpoints whose mailbox is full: the poller claims none of theirs.
    fn full_endpoints(&self) -> Vec<String> {
        self.workers
            .borrow()
            .iter()
            .filter(|(_, tx)| tx.capacity() == 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Puts `job` in its endpoint's mailbox, starting the worker if needed. False when there is
    /// no room: the caller gives the delivery back to PostgreSQL ([`Shared::release`]).
    fn hand(self: &Rc<Self>, job: Job) -> bool {
        if self.held.borrow().get(&job.delivery_id).map(|h| h.retry_until) == Some(job.retry_until) {
            // Already here, waiting or in flight; the claim only renewed its lease. (Claimed in
            // another window, it is a redelivery asked for meanwhile: it is sent again.)
            return true;
        }
        if self.room() == 0 {
            return false;
        }
        let delivery = job.delivery_id;
        let held = Held {
            retry_until: job.retry_until,
            attempts: job.attempts,
        };
        let id = job.endpoint.id.clone();
        let sender = {
            let mut workers = self.workers.borrow_mut();
            workers
                .entry(id.clone())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(self.config.endpoint_queue);
                    actix_rt::spawn(work(self.clone(), id.clone(), rx));
                    tx
                })
                .clone()
        };
        match sender.try_send(job) {
            Ok(()) => {
                self.held.borrow_mut().insert(delivery, held);
                self.stats.mailbox_depth.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Endpoints the recorder has just disabled: counted, forgotten by the cache, logged.
    fn disabled(&self, endpoints: Vec<crate::adapters::postgres::webhooks_out::Disabled>) {
        for d in endpoints {
            self.metrics.webhook_endpoint_disabled();
            self.cache.invalidate(&d.merchant_id);
            tracing::warn!(endpoint = %d.id, "webhook endpoint disabled: every delivery failed for the whole retry window");
        }
    }

    /// Deliveries this node claimed and had no room for go back, due in a second: a full
    /// mailbox must not hold them for a whole lease.
    async fn release(&self, ids: &[i64]) {
        if let Err(e) = self.db.release_deliveries(ids, NO_ROOM_DELAY).await {
            tracing::warn!(error = %e, "webhooks: cannot give back deliveries; they wait for their lease");
        }
    }

    /// One attempt: the endpoint as it is now (a job may have waited in its mailbox while the
    /// merchant changed its URL, rotated its secret, disabled or deleted it), signed with its
    /// current secrets, POSTed, and the outcome passed on.
    async fn attempt(&self, job: Job) {
        let endpoint = match self.cache.get(&self.db, &job.endpoint.merchant_id).await {
            Ok(list) => list.iter().find(|e| e.id == job.endpoint.id).cloned(),
            Err(e) => {
                // Nothing is sent on a guess: the delivery's lease runs out and it is claimed again.
                tracing::warn!(endpoint = %job.endpoint.id, error = %e, "webhooks: cannot read the endpoint; not sent");
                return;
            }
        };
        // Disabled (its pending deliveries ended) or deleted (they went with it) meanwhile.
        let Some(endpoint) = endpoint else { return };
        let now = Utc::now();
        let header = signature_header(&job.body, &endpoint.signing_secrets(now), now.timestamp());
        let sent = self.client.post(&endpoint.url, &header, job.body.clone()).await;
        let at = Utc::now();
        let lag = job
            .event_created
            .filter(|_| sent.succeeded())
            .and_then(|c| (at - c).to_std().ok());
        self.metrics.webhook_delivery(sent.outcome, sent.latency, lag);
        let next_attempt_at = if sent.succeeded() {
            None
        } else {
            let failures = u32::try_from(job.attempts + 1).unwrap_or(u32::MAX);
            let delay = retry_delay(
                failures,
                Duration::from_millis(self.config.retry_base_ms),
                Duration::from_millis(self.config.retry_max_ms),
                rand::random(),
            );
            let next = at + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
            (next <= job.retry_until).then_some(next)
        };
        if !sent.succeeded() {
            tracing::debug!(endpoint = %job.endpoint.id, delivery = job.delivery_id, outcome = sent.outcome,
                            status = ?sent.status, "webhook delivery failed");
        }
        let attempt = Attempt {
            delivery_id: job.delivery_id,
            prev_attempts: job.attempts,
            endpoint_id: job.endpoint.id.clone(),
            at,
            status_code: sent.status.map(|s| s as i16),
            latency_ms: i32::try_from(sent.latency.as_millis()).unwrap_or(i32::MAX),
            response: sent.response,
            error: sent.error,
            succeeded: sent.outcome == "succeeded",
            next_attempt_at,
            retry_until: job.retry_until,
        };
        // Bounded: when the recorder is behind, POSTs wait here.
        let _ = self.outcomes.send(attempt).await;
    }
}

/// An endpoint's worker: takes jobs from its mailbox and runs at most
/// `max_in_flight_per_endpoint` at once; leaves after [`WORKER_IDLE`] without work.
async fn work(shared: Rc<Shared>, endpoint: String, mut rx: mpsc::Receiver<Job>) {
    shared.stats.live.fetch_add(1, Ordering::Relaxed);
    let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight_per_endpoint));
    loop {
        let job = match tokio::time::timeout(WORKER_IDLE, rx.recv()).await {
            Ok(Some(job)) => job,
            _ => break,
        };
        shared.stats.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
        shared.stats.messages.fetch_add(1, Ordering::Relaxed);
        let (Ok(permit), Ok(total)) = (
            in_flight.clone().acquire_owned().await,
            shared.in_flight.clone().acquire_owned().await,
        ) else {
            break;
        };
        let s = shared.clone();
        actix_rt::spawn(async move {
            let _permits = (permit, total);
            let (delivery, window) = (job.delivery_id, job.retry_until);
            s.attempt(job).await;
            let mut held = s.held.borrow_mut();
            if held.get(&delivery).map(|h| h.retry_until) == Some(window) {
                held.remove(&delivery);
            }
        });
    }
    // Same poll as the timeout: nothing was sent to this mailbox in between.
    shared.workers.borrow_mut().remove(&endpoint);
    rx.close();
    while let Ok(job) = rx.try_recv() {
        // Cannot happen (see above); a job dropped here would only wait for its lease.
        shared.held.borrow_mut().remove(&job.delivery_id);
        shared.stats.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
    }
    shared.stats.live.fetch_sub(1, Ordering::Relaxed);
}

/// The dispatcher: JetStream → pending deliveries in PostgreSQL → acks → mailboxes.
async fn dispatch(shared: Rc<Shared>, nats: Nats) {
    let _running = shared.shutdown.enter();
    let prefix = format!("{}.events.", nats.prefix);
    let mut backoff = Duration::from_millis(100);
    while !shared.shutdown.is_stopping() {
        let consumer = match nats.webhooks_consumer(CONSUMER_ACK_WAIT).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook dispatcher: consumer unavailable; retrying");
                shared.shutdown.sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        while !shared.shutdown.is_stopping() {
            let messages = match crate::adapters::nats::fetch_batch(&consumer, shared.config.fetch_batch).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook dispatcher: fetch failed");
                    shared.shutdown.sleep(Duration::from_millis(500)).await;
                    break;
                }
            };
            if messages.is_empty() {
                continue;
            }
            if let Err(e) = dispatch_batch(&shared, &prefix, &messages).await {
                tracing::warn!(error = %e, "webhook dispatcher: cannot store deliveries; the events come again");
                for m in &messages {
                    let _ = m
                        .ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
                shared.shutdown.sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// An event as the dispatcher reads it from JetStream.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(rename = "type", borrow)]
    event_type: &'a str,
    #[serde(borrow)]
    created_at: &'a str,
}

async fn dispatch_batch(
    shared: &Rc<Shared>,
    prefix: &str,
    messages: &[async_nats::jetstream::Message],
) -> Result<(), StoreError> {
    // (merchant, event id, type, created, body) of each readable event.
    let mut events = Vec::with_capacity(messages.len());
    for m in messages {
        let merchant = m.subject.as_str().strip_prefix(prefix).unwrap_or_default();
        let parsed = serde_json::from_slice::<Envelope>(&m.payload).ok().and_then(|e| {
            let created = DateTime::parse_from_rfc3339(e.created_at).ok()?.with_timezone(&Utc);
            Some((
                parse_event_id(e.id)?,
                e.event_type.to_owned(),
                created,
                m.payload.clone(),
            ))
        });
        let parsed = match parsed {
            Some(p) => Some(p),
            // Another shape (a node of an older version published it): the row itself, by the
            // message id the relay gives every event, `outbox-<row id>`.
            None => match outbox_id(m) {
                Some(id) => shared.db.event_by_id(id).await?.map(|row| {
                    let body = Bytes::from(serde_json::to_vec(&row.to_object()).unwrap_or_default());
                    (row.id, row.event_type, row.created_at, body)
                }),
                None => None,
            },
        };
        match parsed {
            Some((id, event_type, created, body)) if !merchant.is_empty() => {
                events.push((merchant.to_owned(), id, event_type, created, body))
            }
            // Nothing could ever read it, or its row is gone: say so, and do not let it block.
            _ => tracing::error!(subject = %m.subject, "webhook dispatcher: an unreadable event; skipped"),
        }
    }
    let mut endpoints: HashMap<&str, Endpoints> = HashMap::new();
    for (merchant, ..) in &events {
        if !endpoints.contains_key(merchant.as_str()) {
            endpoints.insert(merchant, shared.cache.get(&shared.db, merchant).await?);
        }
    }
    let mut pairs = Vec::new();
    let mut by_pair: HashMap<(String, i64), (Arc<EndpointRow>, usize)> = HashMap::new();
    for (i, (merchant, id, event_type, ..)) in events.iter().enumerate() {
        for e in endpoints[merchant.as_str()].iter() {
            if wants(&e.enabled_events, event_type) {
                pairs.push((e.id.clone(), *id));
                by_pair.insert((e.id.clone(), *id), (e.clone(), i));
            }
        }
    }
    let new = shared
        .db
        .insert_deliveries(&pairs, shared.lease(), shared.window())
        .await?;
    for m in messages {
        // A lost ack only means this batch comes again, and its deliveries already exist.
        let _ = m.ack().await;
    }
    let mut no_room = Vec::new();
    for d in new {
        let Some((endpoint, i)) = by_pair.get(&(d.endpoint_id.clone(), d.event_id)) else {
            continue;
        };
        let (_, _, _, created, body) = &events[*i];
        let handed = shared.hand(Job {
            delivery_id: d.id,
            endpoint: endpoint.clone(),
            body: body.clone(),
            attempts: 0,
            retry_until: d.retry_until,
            event_created: Some(*created),
        });
        if !handed {
            no_room.push(d.id);
        }
    }
    shared.release(&no_room).await;
    Ok(())
}

/// The outbox row id of a relayed event, from its `Nats-Msg-Id` (`outbox-<id>`).
fn outbox_id(m: &async_nats::jetstream::Message) -> Option<i64> {
    m.headers
        .as_ref()?
        .get("Nats-Msg-Id")?
        .as_str()
        .strip_prefix("outbox-")?
        .parse()
        .ok()
}

/// The poller: deliveries whose time has come, from PostgreSQL; and old events pruned.
async fn poll(shared: Rc<Shared>) {
    let _running = shared.shutdown.enter();
    let interval = Duration::from_millis(shared.config.poll_interval_ms.max(10));
    let mut last_prune: Option<Instant> = None;
    let mut last_renewal = Instant::now();
    while !shared.shutdown.is_stopping() {
        if last_renewal.elapsed() >= shared.lease() / 3 {
            last_renewal = Instant::now();
            renew_leases(&shared).await;
        }
        let room = shared.room().min(shared.config.fetch_batch) as i64;
        let mut full = false;
        if room > 0 {
            let skip = shared.full_endpoints();
            match shared.db.claim_due_deliveries(room, shared.lease(), &skip).await {
                Ok(due) => {
                    let claimed = due.len() as i64;
                    let mut no_room = Vec::new();
                    for d in due {
                        let endpoint = match shared.cache.get(&shared.db, &d.merchant_id).await {
                            Ok(list) => list.iter().find(|e| e.id == d.endpoint_id).cloned(),
                            Err(_) => None,
                        };
                        // Disabled or deleted meanwhile: its lease runs out; disabling ended it.
                        let Some(endpoint) = endpoint else { continue };
                        let body = Bytes::from(serde_json::to_vec(&d.event.to_object()).unwrap_or_default());
                        let handed = shared.hand(Job {
                            delivery_id: d.id,
                            endpoint,
                            body,
                            attempts: d.attempts,
                            retry_until: d.retry_until,
                            event_created: Some(d.event.created_at),
                        });
                        if !handed {
                            no_room.push(d.id);
                        }
                    }
                    // Claim again at once only while every claimed delivery found room.
                    full = claimed == room && no_room.is_empty();
                    shared.release(&no_room).await;
                }
                Err(e) => tracing::warn!(error = %e, "webhook poller: cannot claim due deliveries"),
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            let days = i64::try_from(shared.config.event_retention_days).unwrap_or(i64::MAX / 86_400);
            let cutoff = Utc::now() - chrono::Duration::days(days.min(100_000));
            match shared.db.prune_events(cutoff, PRUNE_BATCH).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "events past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot prune old events"),
            }
        }
        if !full && shared.shutdown.sleep(interval).await {
            break;
        }
    }
}

/// Renews the leases of the deliveries this node holds, a third of a lease before they could
/// run out, so that a delivery waiting in a long mailbox is not claimed and POSTed by another
/// node meanwhile. Each renewal is fenced by the claim it renews (the attempts made and the
/// retry window): an outcome recorded since, or a redelivery asked for, is left as it is.
async fn renew_leases(shared: &Shared) {
    let held: Vec<(i64, Held)> = shared.held.borrow().iter().map(|(id, h)| (*id, *h)).collect();
    for chunk in held.chunks(RENEW_CHUNK) {
        if let Err(e) = shared
            .db
            .renew_delivery_leases(chunk_columns(chunk), shared.lease())
            .await
        {
            // Not fatal: a lease that runs out means at worst one duplicate POST (at least once).
            tracing::warn!(error = %e, "webhook poller: cannot renew the leases of held deliveries");
            return;
        }
    }
}

fn chunk_columns(chunk: &[(i64, Held)]) -> (Vec<i64>, Vec<i32>, Vec<DateTime<Utc>>) {
    let mut columns = (
        Vec::with_capacity(chunk.len()),
        Vec::with_capacity(chunk.len()),
        Vec::with_capacity(chunk.len()),
    );
    for (id, h) in chunk {
        columns.0.push(*id);
        columns.1.push(h.attempts);
        columns.2.push(h.retry_until);
    }
    columns
}

/// The recorder: outcomes in batches, each batch one transaction; a failed write is retried
/// (the outcomes wait, and so, once the queue is full, do the workers).
async fn record(shared: Rc<Shared>, mut rx: mpsc::Receiver<Attempt>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < RECORD_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let slack = shared.lease() + Duration::from_millis(shared.config.timeout_ms);
        let mut backoff = Duration::from_millis(100);
        loop {
            match shared.db.record_attempts(&batch, shared.window(), slack).await {
                Ok(disabled) => {
                    shared.disabled(disabled);
                    break;
                }
                Err(StoreError::Broken) => {
                    // A row PostgreSQL refuses must not hold up the others: one by one, and a
                    // row refused alone is written without the endpoint's answer; if even that
                    // fails it is dropped (its lease ends and the delivery is made again).
                    for a in &batch {
                        let plain = Attempt {
                            response: None,
                            error: Some("the outcome could not be stored as received".into()),
                            ..a.clone()
                        };
                        for (i, one) in [a, &plain].into_iter().enumerate() {
                            let written = shared
                                .db
                                .record_attempts(std::slice::from_ref(one), shared.window(), slack)
                                .await;
                            match written {
                                Ok(disabled) => {
                                    shared.disabled(disabled);
                                    break;
                                }
                                Err(e) if i == 1 => {
                                    tracing::error!(delivery = a.delivery_id, error = %e, "webhook recorder: an outcome cannot be written; dropped")
                                }
                                Err(_) => {}
                            }
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook recorder: cannot write outcomes; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}
