//! Metrics for operators, kept and encoded by `prometheus-client` (the Prometheus project's
//! Rust client) and served by `GET /metrics` in the OpenMetrics text format, which Prometheus
//! scrapes natively. Recording is a few atomic operations on hot paths. Label values are
//! bounded sets (route patterns, statuses, operations, actor kinds), never ids.
//!
//! Some figures live elsewhere (actor mailboxes, ledger batches, JetStream lag, the pool):
//! [`Scrape`] carries them in, and [`Metrics::encode`] sets them just before encoding.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Seconds: 100 µs to 10 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A waiting PSP event's age: a second to a day.
const WAIT_AGES: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 3_600.0, 14_400.0, 86_400.0];

fn seconds() -> Histogram {
    Histogram::new(SECONDS.iter().copied())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PspLabels {
    psp: &'static str,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PspOnlyLabels {
    psp: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PspErrorLabels {
    psp: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActorLabels {
    actor: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointKindLabels {
    endpoint_kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PspKindLabels {
    psp: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExceptionLabels {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// One actor kind's figures, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActorFigures {
    pub depth: i64,
    pub live: i64,
    pub restarts: u64,
    pub messages: u64,
}

/// The figures kept outside these metrics, gathered for one scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    pub actors: Vec<(&'static str, ActorFigures)>,
    pub ledger_split_batches: u64,
    /// JetStream's pending, ack-pending and redelivered PSP events, if it answered in time.
    pub consumer_lag: Option<(u64, u64, u64)>,
    pub dead_letters_unreplayed: Option<i64>,
    /// Keys (IPs, cards, emails) the risk velocity counters hold.
    pub risk_velocity_keys: i64,
    /// Pool connections in use, idle, and callers waiting for one.
    pub pool: (i64, i64, i64),
    /// Merchant webhook deliveries waiting, if PostgreSQL answered in time.
    pub webhook_backlog: Option<crate::adapters::postgres::webhooks_out::Backlog>,
    /// Partitions this node owns and live nodes it sees, in cluster mode.
    pub cluster: Option<(i64, i64)>,
}

pub struct Metrics {
    registry: Registry,
    http: Histograms<HttpLabels>,
    psp: Histograms<PspLabels>,
    psp_errors: Family<PspErrorLabels, Counter>,
    psp_failovers: Family<ReasonLabels, Counter>,
    breakers_open: Family<PspOnlyLabels, Gauge>,
    breaker_opened: Family<PspOnlyLabels, Counter>,
    actor_handle: Histograms<ActorLabels>,
    psp_events: Family<EventLabels, Counter>,
    idempotency_replays: Counter,
    idempotency_conflicts: Family<KindLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    ledger_commit: Histogram,
    ledger_batch_size: Histogram,
    idempotency_claim: Histogram,
    payment_commit: Histograms<KindLabels>,
    ledger_split_batches: Counter,
    mailbox_depth: Family<ActorLabels, Gauge>,
    actors_live: Family<ActorLabels, Gauge>,
    actor_restarts: Family<ActorLabels, Counter>,
    actor_messages: Family<ActorLabels, Counter>,
    consumer_pending: Gauge,
    consumer_ack_pending: Gauge,
    consumer_redelivered: Gauge,
    dead_letters_unreplayed: Gauge,
    pool_connections: Family<PoolLabels, Gauge>,
    pool_waiters: Gauge,
    risk_decisions: Family<OutcomeLabels, Counter>,
    risk_velocity_keys: Gauge,
    webhook_deliveries: Family<OutcomeLabels, Counter>,
    webhook_post: Histogram,
    webhook_lag: Histogram,
    psp_event_wait_age: Histogram,
    key_lookups_refused: Counter,
    webhook_pending: Gauge,
    webhook_retrying: Gauge,
    webhook_oldest: Family<EndpointKindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    webhook_endpoints_disabled: Counter,
    reconciliation_ratio: Family<PspKindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reconciliation_lines: Family<OutcomeLabels, Counter>,
    reconciliation_open: Family<ExceptionLabels, Gauge>,
    cluster_moves: Family<KindLabels, Counter>,
    cluster_partitions_owned: Gauge,
    cluster_nodes: Gauge,
    forwarded: Family<OutcomeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("payrail");
        let m = Metrics {
            http: Histograms::new_with_constructor(seconds),
            psp: Histograms::new_with_constructor(seconds),
            psp_errors: Family::default(),
            psp_failovers: Family::default(),
            breakers_open: Family::default(),
            breaker_opened: Family::default(),
            actor_handle: Histograms::new_with_constructor(seconds),
            psp_events: Family::default(),
            idempotency_replays: Counter::default(),
            idempotency_conflicts: Family::default(),
            transitions: Family::default(),
            ledger_commit: seconds(),
            // 1, 2, 4, … 2,048 commits per transaction.
            ledger_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            idempotency_claim: seconds(),
            payment_commit: Histograms::new_with_constructor(seconds),
            ledger_split_batches: Counter::default(),
            mailbox_depth: Family::default(),
            actors_live: Family::default(),
            actor_restarts: Family::default(),
            actor_messages: Family::default(),
            consumer_pending: Gauge::default(),
            consumer_ack_pending: Gauge::default(),
            consumer_redelivered: Gauge::default(),
            dead_letters_unreplayed: Gauge::default(),
            pool_connections: Family::default(),
            pool_waiters: Gauge::default(),
            risk_decisions: Family::default(),
            risk_velocity_keys: Gauge::default(),
            webhook_deliveries: Family::default(),
            webhook_post: seconds(),
            webhook_lag: seconds(),
            psp_event_wait_age: Histogram::new(WAIT_AGES.iter().copied()),
            key_lookups_refused: Counter::default(),
            webhook_pending: Gauge::default(),
            webhook_retrying: Gauge::default(),
            webhook_oldest: Family::default(),
            webhook_endpoints_disabled: Counter::default(),
            cluster_moves: Family::default(),
            cluster_partitions_owned: Gauge::default(),
            cluster_nodes: Gauge::default(),
            forwarded: Family::default(),
            reconciliation_ratio: Family::default(),
            reconciliation_lines: Family::default(),
            reconciliation_open: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "http_request_duration_seconds",
            "HTTP requests by route pattern and status",
            m.http.clone(),
        );
        r.register(
            "psp_request_duration_seconds",
            "Calls to the PSP by operation",
            m.psp.clone(),
        );
        r.register(
            "psp_errors",
            "PSP calls that failed: timeouts, outages, refused requests",
            m.psp_errors.clone(),
        );
        r.register(
            "psp_failovers",
            "Authorizations sent on to the next connector, by why: unreachable or soft_decline",
            m.psp_failovers.clone(),
        );
        r.register(
            "psp_breakers_open",
            "Connectors whose circuit breaker is open or half-open, by PSP kind",
            m.breakers_open.clone(),
        );
        r.register(
            "psp_breaker_opened",
            "Times a connector's circuit breaker opened, by PSP kind",
            m.breaker_opened.clone(),
        );
        r.register(
            "actor_handle_duration_seconds",
            "Time an actor spent on one message (a batch, for ledger shards)",
            m.actor_handle.clone(),
        );
        r.register(
            "psp_events",
            "PSP webhook events by provider and outcome",
            m.psp_events.clone(),
        );
        r.register(
            "idempotency_replays",
            "Requests answered from a stored idempotent response",
            m.idempotency_replays.clone(),
        );
        r.register(
            "idempotency_conflicts",
            "Idempotency-Key refused: in_use (409) or reused (422)",
            m.idempotency_conflicts.clone(),
        );
        r.register(
            "payment_transitions",
            "Payment status changes committed",
            m.transitions.clone(),
        );
        r.register(
            "ledger_commit_duration_seconds",
            "Time of one ledger batch transaction",
            m.ledger_commit.clone(),
        );
        r.register(
            "ledger_batch_size",
            "Commits written per ledger transaction",
            m.ledger_batch_size.clone(),
        );
        r.register(
            "idempotency_claim_duration_seconds",
            "Time a request waited for its Idempotency-Key to be claimed (or found) before its work began",
            m.idempotency_claim.clone(),
        );
        r.register(
            "payment_commit_duration_seconds",
            "Time one payment actor's commit waited, from its ledger shard's mailbox to its answer, by what it records",
            m.payment_commit.clone(),
        );
        r.register(
            "ledger_split_batches",
            "Ledger batches that failed whole and were retried commit by commit",
            m.ledger_split_batches.clone(),
        );
        r.register(
            "actor_mailbox_depth",
            "Messages sent to actors of a kind and not yet taken up",
            m.mailbox_depth.clone(),
        );
        r.register("actors_live", "Actors of a kind in memory", m.actors_live.clone());
        r.register(
            "actor_restarts",
            "Actors that panicked or lost a write race and restarted from PostgreSQL",
            m.actor_restarts.clone(),
        );
        r.register(
            "actor_messages",
            "Messages actors of a kind handled",
            m.actor_messages.clone(),
        );
        r.register(
            "psp_consumer_pending",
            "PSP events in JetStream not yet delivered to payrail",
            m.consumer_pending.clone(),
        );
        r.register(
            "psp_consumer_ack_pending",
            "PSP events delivered and not yet acknowledged",
            m.consumer_ack_pending.clone(),
        );
        r.register(
            "psp_consumer_redelivered",
            "PSP events JetStream delivered more than once",
            m.consumer_redelivered.clone(),
        );
        r.register(
            "dead_letters_unreplayed",
            "PSP events parked as dead letters and not replayed yet (alert when above 0)",
            m.dead_letters_unreplayed.clone(),
        );
        r.register(
            "db_pool_connections",
            "Database pool connections by state",
            m.pool_connections.clone(),
        );
        r.register(
            "db_pool_waiters",
            "Callers waiting for a database connection",
            m.pool_waiters.clone(),
        );
        r.register(
            "risk_decisions",
            "Risk rule decisions before authorization, by outcome",
            m.risk_decisions.clone(),
        );
        r.register(
            "risk_velocity_keys",
            "IPs, cards and emails the velocity counters hold (bounded)",
            m.risk_velocity_keys.clone(),
        );
        r.register(
            "webhook_deliveries",
            "Merchant webhook delivery attempts by outcome: succeeded, http_error, timeout, connect_error, refused_target",
            m.webhook_deliveries.clone(),
        );
        r.register(
            "webhook_request_duration_seconds",
            "Time of one webhook POST, to the end of the answer's first 1 KiB",
            m.webhook_post.clone(),
        );
        r.register(
            "webhook_commit_to_delivery_seconds",
            "From an event's commit to the 2xx that delivered it",
            m.webhook_lag.clone(),
        );
        r.register(
            "api_key_lookups_refused",
            "Requests refused (429 too_many_failed_keys) because their client's keys were not valid too often this minute",
            m.key_lookups_refused.clone(),
        );
        r.register(
            "psp_event_waiting_age_seconds",
            "Age (since JetStream took it) of each PSP event delivered again because its payment was held up by the PSP's API or payrail's bounds (outcome `waiting`)",
            m.psp_event_wait_age.clone(),
        );
        r.register(
            "webhook_deliveries_pending",
            "Webhook deliveries not yet made (first attempts and retries)",
            m.webhook_pending.clone(),
        );
        r.register(
            "webhook_retry_queue",
            "Webhook deliveries that failed at least once and wait for a retry",
            m.webhook_retrying.clone(),
        );
        r.register(
            "webhook_oldest_undelivered_seconds",
            "Age of the oldest undelivered event: for healthy endpoints (payrail's lag) and failing ones (the merchant's outage)",
            m.webhook_oldest.clone(),
        );
        r.register(
            "webhook_endpoints_disabled",
            "Webhook endpoints disabled after failing for the whole retry window",
            m.webhook_endpoints_disabled.clone(),
        );
        r.register(
            "cluster_partition_moves",
            "Partition leases this node took (acquired), gave up to rebalance (released) or lost (lost: not renewed in time, or taken)",
            m.cluster_moves.clone(),
        );
        r.register(
            "cluster_partitions_owned",
            "Partitions whose lease this node holds (cluster mode)",
            m.cluster_partitions_owned.clone(),
        );
        r.register(
            "cluster_nodes",
            "Live nodes this node sees in the cluster (cluster mode)",
            m.cluster_nodes.clone(),
        );
        r.register(
            "cluster_forwarded_calls",
            "Payment calls this node forwarded to their partition's owner, by outcome",
            m.forwarded.clone(),
        );
        r.register(
            "reconciliation_match_ratio",
            "Matched report lines over matched lines and new exceptions, in the last run, by PSP kind (SLO: 0.9999)",
            m.reconciliation_ratio.clone(),
        );
        r.register(
            "reconciliation_lines",
            "Settlement report lines applied, by outcome: matched or exception",
            m.reconciliation_lines.clone(),
        );
        r.register(
            "reconciliation_exceptions_open",
            "Reconciliation exceptions waiting for an operator, by type",
            m.reconciliation_open.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn http(&self, route: &str, status: u16, d: Duration) {
        self.http
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                status,
            })
            .observe(d.as_secs_f64());
    }

    pub fn psp_call(&self, psp: &'static str, operation: &'static str, d: Duration) {
        self.psp
            .get_or_create(&PspLabels { psp, operation })
            .observe(d.as_secs_f64());
    }

    pub fn psp_failover(&self, reason: &'static str) {
        self.psp_failovers.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// What a call's result did to a connector's breaker.
    pub fn psp_breaker(&self, psp: &'static str, change: crate::adapters::psp::connector::BreakerChange) {
        let l = PspOnlyLabels { psp };
        if change.opened {
            self.breaker_opened.get_or_create(&l).inc();
        }
        if change.left_closed {
            self.breakers_open.get_or_create(&l).inc();
        }
        if change.closed {
            self.breakers_open.get_or_create(&l).dec();
        }
    }

    pub fn psp_error(&self, psp: &'static str, code: &'static str) {
        self.psp_errors.get_or_create(&PspErrorLabels { psp, code }).inc();
    }

    pub fn handled(&self, actor: &'static str, d: Duration) {
        self.actor_handle
            .get_or_create(&ActorLabels { actor })
            .observe(d.as_secs_f64());
    }

    pub fn psp_event(&self, provider: &str, outcome: &'static str) {
        self.psp_events
            .get_or_create(&EventLabels {
                provider: provider.to_owned(),
                outcome,
            })
            .inc();
    }

    /// A PSP event that waits (outcome `waiting`), this old since JetStream took it.
    pub fn psp_event_waiting(&self, age: Duration) {
        self.psp_event_wait_age.observe(age.as_secs_f64());
    }

    /// A key look-up refused: its client's keys failed too often this minute.
    pub fn key_lookup_refused(&self) {
        self.key_lookups_refused.inc();
    }

    pub fn replayed(&self) {
        self.idempotency_replays.inc();
    }

    pub fn idempotency_conflict(&self, kind: &'static str) {
        self.idempotency_conflicts.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn transition(&self, from: &'static str, to: &'static str) {
        self.transitions.get_or_create(&TransitionLabels { from, to }).inc();
    }

    /// A risk decision before an authorization.
    pub fn risk_decision(&self, outcome: &'static str) {
        self.risk_decisions.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// One webhook attempt: its outcome, its POST's time, and (on success) commit to delivery.
    pub fn webhook_delivery(&self, outcome: &'static str, took: Duration, lag: Option<Duration>) {
        self.webhook_deliveries.get_or_create(&OutcomeLabels { outcome }).inc();
        self.webhook_post.observe(took.as_secs_f64());
        if let Some(lag) = lag {
            self.webhook_lag.observe(lag.as_secs_f64());
        }
    }

    /// A reconciliation run's lines: `matched`, and those that raised an exception.
    pub fn reconciliation_run(&self, psp: &str, matched: i64, exceptions: i64) {
        let (m, e) = (matched.max(0) as u64, exceptions.max(0) as u64);
        self.reconciliation_lines
            .get_or_create(&OutcomeLabels { outcome: "matched" })
            .inc_by(m);
        self.reconciliation_lines
            .get_or_create(&OutcomeLabels { outcome: "exception" })
            .inc_by(e);
        if m + e > 0 {
            self.reconciliation_ratio
                .get_or_create(&PspKindLabels { psp: psp.to_owned() })
                .set(m as f64 / (m + e) as f64);
        }
    }

    /// Open exceptions by type (every type seen is kept, at 0 once none is open).
    pub fn reconciliation_open(&self, open: &[(String, i64)]) {
        for t in crate::domain::settlement::EXCEPTION_TYPES {
            let n = open.iter().find(|(k, _)| k == t).map(|(_, n)| *n).unwrap_or(0);
            self.reconciliation_open
                .get_or_create(&ExceptionLabels { r#type: t.to_owned() })
                .set(n);
        }
    }

    pub fn webhook_endpoint_disabled(&self) {
        self.webhook_endpoints_disabled.inc();
    }

    /// A request's claim of its key, from asking to the answer (the claims' group commit).
    pub fn idempotency_claim(&self, took: Duration) {
        self.idempotency_claim.observe(took.as_secs_f64());
    }

    /// One payment commit, from the actor's asking to the answer: `attempt_start` (before a
    /// PSP call), `psp_answer`, `psp_event` or `other`.
    pub fn payment_commit(&self, kind: &'static str, took: Duration) {
        self.payment_commit
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    /// One ledger batch: how many commits it held and how long its transaction took.
    pub fn ledger_batch(&self, size: usize, took: Duration) {
        self.ledger_batch_size.observe(size as f64);
        self.ledger_commit.observe(took.as_secs_f64());
    }

    /// A partition lease taken (`acquired`), given up (`released`) or lost (`lost`).
    pub fn cluster_move(&self, kind: &'static str) {
        self.cluster_moves.get_or_create(&KindLabels { kind }).inc();
    }

    /// A call forwarded to its partition's owner: `ok`, `refused` (the owner answered an
    /// error), `unavailable` (no answer in time, or NATS down).
    pub fn forwarded(&self, outcome: &'static str) {
        self.forwarded.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The OpenMetrics text of every metric, with `scrape`'s figures set first.
    pub fn encode(&self, scrape: &Scrape) -> String {
        for (actor, f) in &scrape.actors {
            let labels = ActorLabels { actor };
            self.mailbox_depth.get_or_create(&labels).set(f.depth);
            self.actors_live.get_or_create(&labels).set(f.live);
            store(&self.actor_restarts.get_or_create(&labels), f.restarts);
            store(&self.actor_messages.get_or_create(&labels), f.messages);
        }
        store(&self.ledger_split_batches, scrape.ledger_split_batches);
        if let Some((pending, ack_pending, redelivered)) = scrape.consumer_lag {
            self.consumer_pending.set(pending as i64);
            self.consumer_ack_pending.set(ack_pending as i64);
            self.consumer_redelivered.set(redelivered as i64);
        }
        if let Some(n) = scrape.dead_letters_unreplayed {
            self.dead_letters_unreplayed.set(n);
        }
        let (in_use, idle, waiting) = scrape.pool;
        self.pool_connections
            .get_or_create(&PoolLabels { state: "in_use" })
            .set(in_use);
        self.pool_connections
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle);
        self.pool_waiters.set(waiting);
        self.risk_velocity_keys.set(scrape.risk_velocity_keys);
        if let Some((owned, nodes)) = scrape.cluster {
            self.cluster_partitions_owned.set(owned);
            self.cluster_nodes.set(nodes);
        }
        if let Some(b) = scrape.webhook_backlog {
            self.webhook_pending.set(b.pending);
            self.webhook_retrying.set(b.retrying);
            for (endpoint_kind, secs) in [("healthy", b.oldest_healthy_secs), ("failing", b.oldest_failing_secs)] {
                self.webhook_oldest
                    .get_or_create(&EndpointKindLabels { endpoint_kind })
                    .set(secs);
            }
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A counter that mirrors a total kept elsewhere (monotonic there too).
fn store(c: &Counter<u64, AtomicU64>, v: u64) {
    c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        m.handled("payment", Duration::from_micros(50));
        m.handled("payment", Duration::from_millis(3));
        m.handled("payment", Duration::from_secs(30));
        let out = m.encode(&Scrape::default());
        let name = "payrail_actor_handle_duration_seconds";
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.0001\",actor=\"payment\"}} 1\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_bucket{{le=\"0.005\",actor=\"payment\"}} 2\n")));
        assert!(out.contains(&format!("{name}_bucket{{le=\"+Inf\",actor=\"payment\"}} 3\n")));
        assert!(out.contains(&format!("{name}_count{{actor=\"payment\"}} 3\n")));
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let m = Metrics::new();
        m.psp_event("sandbox", "applied");
        let out = m.encode(&Scrape {
            actors: vec![
                ("payment", ActorFigures::default()),
                ("ledger_shard", ActorFigures::default()),
            ],
            ..Scrape::default()
        });
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{out}");
        assert_eq!(types.len(), out.lines().filter(|l| l.starts_with("# HELP ")).count());
    }
}
