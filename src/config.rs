//! Configuration: `config.toml`, then `PAYRAIL__SECTION__KEY` environment overrides.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub nats: NatsConfig,
    pub admin: AdminConfig,
    pub actors: ActorsConfig,
    pub payments: PaymentsConfig,
    pub ledger: LedgerConfig,
    pub idempotency: IdempotencyConfig,
    pub psp: PspConfig,
    pub sandbox: SandboxConfig,
    pub webhooks: WebhooksConfig,
    /// Optional: every key has a safe default (private targets refused).
    #[serde(default)]
    pub webhooks_out: WebhooksOutConfig,
    pub ratelimit: RateLimitConfig,
    pub risk: RiskConfig,
    /// Optional: every key has a default.
    #[serde(default)]
    pub reconciliation: ReconciliationConfig,
    /// Optional: every key has a default.
    #[serde(default)]
    pub marketplace: MarketplaceConfig,
    /// Optional: every key has a default.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Optional: without a key, connectors that carry credentials cannot be made.
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// Optional: without it (or with `enabled = false`) payrail runs as one node per database.
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

/// Orchestration between connectors (docs/API.md, "Routing").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Declines worth one more try on another connector (a decline code, or the failure code
    /// when there is none).
    pub soft_declines: Vec<String>,
    /// Every connector's circuit breaker.
    pub breaker: crate::domain::routing::BreakerConfig,
    /// How long a node trusts the connectors and rules it read of a merchant; a change made
    /// through this node applies at once.
    pub cache_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            soft_declines: [
                "processing_error",
                "issuer_unavailable",
                "try_again_later",
                "reenter_transaction",
            ]
            .map(String::from)
            .to_vec(),
            breaker: crate::domain::routing::BreakerConfig::default(),
            cache_ms: 5_000,
        }
    }
}

/// Secrets at rest. Its `Debug` never shows the key.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The AES-256 key that seals connectors' credentials: 64 hex digits (32 bytes). Set it by
    /// `PAYRAIL__SECRETS__KEY` rather than in a file.
    pub key: String,
}

impl std::fmt::Debug for SecretsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsConfig")
            .field("key", &if self.key.is_empty() { "" } else { "***" })
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskConfig {
    /// Evaluate merchants' risk rules before every authorization.
    pub enabled: bool,
    /// Apply the built-in card-testing rules to every merchant (a merchant's `allow` rule
    /// overrides them).
    pub default_rules: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    /// The address others reach payrail at (3-D Secure redirects, the sandbox's webhooks).
    /// Empty: derived from the address actually bound ([`ServerConfig::public_url_for`]).
    pub public_url: String,
    pub workers: usize,
    pub body_limit_bytes: usize,
    pub max_connections: usize,
    /// On SIGTERM or SIGINT: how long in-flight requests, then the background loops, may take
    /// to finish before the process exits anyway.
    pub shutdown_timeout_secs: u64,
}

impl ServerConfig {
    /// `public_url` if set, else `http://` and the bound address, with a wildcard address
    /// (0.0.0.0, ::) replaced by loopback so that the sandbox's webhooks reach this process.
    pub fn public_url_for(&self, bound: std::net::SocketAddr) -> String {
        let set = self.public_url.trim_end_matches('/');
        if !set.is_empty() {
            return set.to_owned();
        }
        let ip = match bound.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: usize,
    pub pool_wait_ms: u64,
    pub connect_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// How long `payrail serve` waits for another node on this database to go before it
    /// refuses to start (one node per database; a restart after `kill -9` may find the old
    /// session not yet ended).
    #[serde(default = "default_node_lock_wait_ms")]
    pub node_lock_wait_ms: u64,
}

fn default_node_lock_wait_ms() -> u64 {
    5_000
}

impl std::fmt::Debug for DatabaseConfig {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &"***")
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    pub stream_prefix: String,
    pub partitions: u32,
    pub duplicate_window_secs: u64,
    pub connect_timeout_ms: u64,
    pub max_stream_messages: i64,
    /// Deliveries of one PSP event before it is parked as a dead letter.
    pub max_deliver: i64,
    pub ack_wait_secs: u64,
    /// Events one consumer fetches at a time: its bound on events in flight.
    pub fetch_batch: usize,
    /// How long the webhook bridge waits for JetStream's ack before answering 503.
    pub publish_timeout_ms: u64,
    /// Copies JetStream keeps of each stream and of the cluster's lease bucket: 1 on a single
    /// nats-server, 3 on a three-server cluster.
    #[serde(default = "one_replica")]
    pub replicas: usize,
}

fn one_replica() -> usize {
    1
}

/// Several payrail nodes on one database and one NATS cluster (docs/DESIGN.md, "Growing past
/// one machine"). Off by default: one process serves the database alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// This node's name, unique in the cluster; empty: `<host>-<pid>`.
    pub node_id: String,
    /// Payments, ledger shards' commits and PSP-event partitions map onto this many partitions,
    /// each owned by one live node. Fixed for the life of a deployment.
    pub partitions: u32,
    /// A lease not renewed for this long expires in NATS KV; another node may then take it.
    pub lease_ttl_ms: u64,
    /// How often a node renews its leases and rebalances.
    pub renew_every_ms: u64,
    /// Partitions a node takes or gives up per round: bounds the moves when nodes join.
    pub max_moves: usize,
    /// How long a call forwarded to a partition's owner may take before the caller gets 503.
    pub forward_timeout_ms: u64,
    /// Forwarded calls one node serves at once; past that, the caller gets 503.
    pub max_forwarded_in_flight: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_id: String::new(),
            partitions: 64,
            lease_ttl_ms: 3_000,
            renew_every_ms: 500,
            max_moves: 16,
            forward_timeout_ms: 20_000,
            max_forwarded_in_flight: 4_096,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token: String,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminConfig { token: *** }")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsConfig {
    pub idle_timeout_ms: u64,
    pub mailbox_capacity: usize,
    pub max_live: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentsConfig {
    pub currencies: Vec<String>,
    pub default_fee_bps: u32,
    pub default_fee_fixed: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    pub shards: usize,
    /// Arbiters (threads) the shards are spread over.
    pub threads: usize,
    pub max_batch: usize,
    pub max_wait_us: u64,
    /// Batches one shard may have in flight at once.
    pub batches_in_flight: usize,
    /// Commits that may wait for one shard; past that, callers get 503.
    pub max_pending: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub retention_hours: u64,
    pub in_flight_lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PspConfig {
    pub provider: String,
    pub timeout_ms: u64,
    pub sandbox: SandboxPspConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPspConfig {
    pub latency_ms: u64,
    pub refund_delay_ms: u64,
    pub max_intents: usize,
    /// Send the sandbox's events as signed webhooks to payrail's own endpoint.
    pub webhooks: bool,
    /// How long after capture `pm_card_createDispute` opens its dispute.
    pub dispute_delay_ms: u64,
    /// The sandbox tokenizer's secret for card fingerprints (a keyed hash of the number).
    pub card_fingerprint_key: Secret,
    pub chaos: ChaosConfig,
    /// What the sandbox charges in its settlement reports.
    #[serde(default)]
    pub settlement: SandboxSettlementConfig,
}

/// The sandbox PSP's fees, as its settlement reports show them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettlementConfig {
    /// Per charge: basis points of the amount plus a fixed amount in minor units.
    pub fee_bps: u32,
    pub fee_fixed: i64,
    /// Per dispute, in minor units.
    pub dispute_fee: i64,
}

impl Default for SandboxSettlementConfig {
    fn default() -> Self {
        SandboxSettlementConfig {
            fee_bps: 250,
            fee_fixed: 25,
            dispute_fee: 1500,
        }
    }
}

/// Marketplaces (docs/API.md, "Marketplaces").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarketplaceConfig {
    /// How often sellers' funds whose day has come move from pending to available, in seconds.
    pub release_every_secs: u64,
    /// Captured credits released per transaction (a tick repeats until none is due).
    pub release_batch: i64,
    /// Make the sellers' scheduled payouts (`daily`, `weekly` on Mondays, UTC).
    pub scheduled_payouts: bool,
    /// A payout still `pending` or `in_transit` this long is handed to the rail again (the
    /// rail takes a payout once per id and reports it again).
    pub payout_recheck_secs: u64,
}

impl Default for MarketplaceConfig {
    fn default() -> Self {
        MarketplaceConfig {
            release_every_secs: 60,
            release_batch: 1000,
            scheduled_payouts: true,
            payout_recheck_secs: 300,
        }
    }
}

/// Reconciliation against PSP settlement reports (docs/OPERATIONS.md, "Reconciliation").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconciliationConfig {
    /// How late a PSP may report a capture or refund: one payrail made more than this long
    /// before the end of a report's day and missing from every report is `missing_in_report`.
    pub window_hours: u64,
    /// How far back each run looks for captures and refunds missing from the reports.
    pub lookback_days: u64,
    /// Run every enabled sandbox connector's report of the day before at this UTC time
    /// ("HH:MM"); empty: no scheduled runs.
    pub daily_at_utc: String,
    /// Report lines applied per transaction.
    pub chunk_lines: usize,
    /// The largest report accepted, in bytes (it is spooled to disk, never held in memory).
    pub max_report_bytes: u64,
    /// Payments settled at once.
    pub settle_concurrency: usize,
}

impl Default for ReconciliationConfig {
    fn default() -> Self {
        ReconciliationConfig {
            window_hours: 48,
            lookback_days: 7,
            daily_at_utc: "02:30".into(),
            chunk_lines: 3000,
            max_report_bytes: 1 << 30,
            settle_concurrency: 256,
        }
    }
}

/// Misbehaviour the sandbox's webhook sender can add, as real PSPs do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// Probability that an event is sent twice.
    pub duplicate: f64,
    /// Probability that an event is held back and sent after the next one.
    pub reorder: f64,
    /// Each event waits a random 0..delay_ms before it is sent.
    pub delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub demo_merchant: bool,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    pub secret: String,
    pub previous_secret: String,
    pub tolerance_seconds: u64,
    pub adyen_hmac_key: String,
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret", &"***")
            .field("tolerance_seconds", &self.tolerance_seconds)
            .finish()
    }
}

/// Merchant webhooks (docs/API.md, "Webhook endpoints"): delivery, retries, and the targets
/// payrail refuses. Every key has a default; the defaults are the production ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksOutConfig {
    /// Deliver events to merchants' endpoints (the events API works either way).
    pub enabled: bool,
    /// Admit `http` URLs and loopback, private and link-local targets: local setups and tests
    /// only. Off by default, so a production deployment cannot be made to call its own network.
    pub allow_private_targets: bool,
    /// An endpoint must answer 2xx within this long.
    pub timeout_ms: u64,
    /// A delivery is retried for this long after its first attempt; an endpoint that failed
    /// every delivery for this long is disabled.
    pub retry_window_secs: u64,
    /// The first retry waits about this long; each next one twice as long, up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// After a rotation the old secret keeps signing for this long.
    pub secret_overlap_secs: u64,
    /// POSTs in flight to one endpoint at most.
    pub max_in_flight_per_endpoint: usize,
    /// Deliveries waiting in memory for one endpoint at most; more wait in PostgreSQL.
    pub endpoint_queue: usize,
    /// Deliveries waiting in memory over all endpoints at most.
    pub max_queued_total: usize,
    /// A node that takes a delivery holds it this long; if it dies, another takes it after.
    pub claim_lease_secs: u64,
    /// Events fetched from JetStream per round, and due retries claimed per round.
    pub fetch_batch: usize,
    /// How often due retries are looked for.
    pub poll_interval_ms: u64,
    /// Events (outbox rows) older than this are deleted, in bounded slices.
    pub event_retention_days: u64,
}

impl Default for WebhooksOutConfig {
    fn default() -> WebhooksOutConfig {
        WebhooksOutConfig {
            enabled: true,
            allow_private_targets: false,
            timeout_ms: 10_000,
            retry_window_secs: 3 * 24 * 3600,
            retry_base_ms: 10_000,
            retry_max_ms: 2 * 3600 * 1000,
            secret_overlap_secs: 24 * 3600,
            max_in_flight_per_endpoint: 16,
            endpoint_queue: 1_000,
            max_queued_total: 100_000,
            claim_lease_secs: 60,
            fetch_batch: 256,
            poll_interval_ms: 1_000,
            event_retention_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub requests_per_second: u32,
    pub burst: u32,
    /// Look-ups of keys that turn out not to exist, per client address and minute, before that
    /// client's look-ups are refused (429) for the rest of the minute; 0 turns it off. Applies
    /// whether or not `enabled` is set.
    #[serde(default = "default_failed_keys_per_minute")]
    pub failed_keys_per_minute: u32,
}

fn default_failed_keys_per_minute() -> u32 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// How log lines are written: for people, or one JSON object per line for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A secret from the configuration: it never prints.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The repository's own config.toml, for tests and tools that run from a checkout.
pub fn repo_config_path() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")
}

impl Config {
    /// Reads `path`, then applies the `PAYRAIL__…` variables of this process's environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        Config::from_toml(&text, std::env::vars())
    }

    /// Parses `text` and applies overrides from `env` (name, value) pairs.
    pub fn from_toml(text: &str, env: impl Iterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        for (name, raw) in env {
            let Some(path) = name.strip_prefix("PAYRAIL__") else {
                continue;
            };
            let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
            set_path(&mut root, &keys, &raw).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
        }
        let config: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.admin.token.len() < 8 {
            return bad("[admin] token must be at least 8 characters");
        }
        if self.actors.mailbox_capacity == 0 || self.actors.max_live == 0 {
            return bad("[actors] mailbox_capacity and max_live must be positive");
        }
        if self.database.pool_size == 0 || self.server.workers == 0 || self.nats.partitions == 0 {
            return bad("pool_size, workers and partitions must be positive");
        }
        if !self
            .nats
            .stream_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.nats.stream_prefix.is_empty()
        {
            return bad("[nats] stream_prefix must be letters, digits or underscores");
        }
        for c in &self.payments.currencies {
            if crate::domain::Currency::parse(c).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "[payments] currencies: {c} is not an ISO 4217 code"
                )));
            }
        }
        let w = &self.webhooks_out;
        if w.timeout_ms == 0 || w.max_in_flight_per_endpoint == 0 || w.endpoint_queue == 0 || w.fetch_batch == 0 {
            return bad("[webhooks_out] timeout_ms, max_in_flight_per_endpoint, endpoint_queue and fetch_batch must be positive");
        }
        if w.claim_lease_secs * 1000 <= w.timeout_ms {
            return bad("[webhooks_out] claim_lease_secs must be longer than timeout_ms: a delivery in flight must not be taken twice");
        }
        if w.poll_interval_ms.saturating_mul(3) >= w.claim_lease_secs.saturating_mul(1000) {
            return bad("[webhooks_out] poll_interval_ms must be under a third of claim_lease_secs: the poller renews the leases of the deliveries its node holds");
        }
        if w.retry_base_ms == 0
            || w.retry_max_ms < w.retry_base_ms
            || w.event_retention_days * 86_400 < w.retry_window_secs
        {
            return bad(
                "[webhooks_out] needs 0 < retry_base_ms <= retry_max_ms and events kept longer than the retry window",
            );
        }
        if w.allow_private_targets && self.psp.provider != "sandbox" {
            return bad("[webhooks_out] allow_private_targets = true is for local use with the sandbox PSP: with a real PSP, merchant webhooks must not reach private networks");
        }
        let c = &self.cluster;
        if c.enabled {
            if c.partitions == 0 || c.partitions < self.nats.partitions {
                return bad("[cluster] partitions must be at least [nats] partitions: each PSP-event partition's consumer runs on the owner of the cluster partition with its number");
            }
            if c.renew_every_ms == 0 || c.lease_ttl_ms < 2 * c.renew_every_ms {
                return bad("[cluster] lease_ttl_ms must be at least twice renew_every_ms: a lease must survive one late renewal");
            }
            if c.max_moves == 0 || c.max_forwarded_in_flight == 0 || c.forward_timeout_ms == 0 {
                return bad("[cluster] max_moves, max_forwarded_in_flight and forward_timeout_ms must be positive");
            }
            if c.forward_timeout_ms >= self.idempotency.in_flight_lease_ms {
                return bad("[cluster] forward_timeout_ms must be shorter than [idempotency] in_flight_lease_ms: a key must stay claimed while its forwarded call may still run");
            }
            if !c
                .node_id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return bad("[cluster] node_id must be letters, digits, '-' or '_'");
            }
        }
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            return bad("[nats] replicas must be 1 to 5");
        }
        if self.sandbox.demo_merchant && self.psp.provider != "sandbox" {
            return bad("[sandbox] demo_merchant = true needs [psp] provider = \"sandbox\": the demo key must never reach a real PSP");
        }
        Ok(())
    }
}

/// Sets `keys` inside `table` to `raw`, typed like the value it replaces: a string stays a
/// string even when it looks like a number, and anything else is parsed as a TOML value.
fn set_path(table: &mut toml::Table, keys: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut t = table;
    for k in parents {
        t = t
            .get_mut(k)
            .ok_or_else(|| format!("{} is not a configuration section", keys.join(".")))?
            .as_table_mut()
            .ok_or_else(|| format!("{k} is not a section"))?;
    }
    let value = match t.get(last) {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        Some(toml::Value::Table(_)) => return Err(format!("{last} is a section, not a key")),
        Some(_) => parse_value(raw).ok_or_else(|| format!("cannot parse {raw:?}"))?,
        // A misspelt override must not be ignored: it names no key of the configuration.
        None => return Err(format!("{} is not a configuration key", keys.join("."))),
    };
    t.insert(last.clone(), value);
    Ok(())
}

fn parse_value(raw: &str) -> Option<toml::Value> {
    let doc: toml::Table = format!("v = {raw}").parse().ok()?;
    doc.get("v").cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        std::fs::read_to_string(repo_config_path()).unwrap()
    }

    #[test]
    fn the_repository_config_loads() {
        let c = Config::from_toml(&base(), std::iter::empty()).unwrap();
        assert_eq!(c.psp.provider, "sandbox");
        assert!(c.sandbox.demo_merchant);
        assert_eq!(c.server.body_limit_bytes, 65536);
    }

    #[test]
    fn environment_overrides_keep_types() {
        let env = [
            ("PAYRAIL__SERVER__BIND", "127.0.0.1:0"),
            ("PAYRAIL__SERVER__WORKERS", "4"),
            ("PAYRAIL__NATS__STREAM_PREFIX", "T123"),
            ("PAYRAIL__ADMIN__TOKEN", "12345678"),
            ("PAYRAIL__PSP__SANDBOX__LATENCY_MS", "250"),
            ("PAYRAIL__PAYMENTS__CURRENCIES", "[\"USD\", \"JPY\"]"),
            ("OTHER__THING", "x"),
        ];
        let c = Config::from_toml(&base(), env.iter().map(|(a, b)| (a.to_string(), b.to_string()))).unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:0");
        assert_eq!(c.server.workers, 4);
        assert_eq!(c.nats.stream_prefix, "T123");
        assert_eq!(c.admin.token, "12345678");
        assert_eq!(c.psp.sandbox.latency_ms, 250);
        assert_eq!(c.payments.currencies, vec!["USD", "JPY"]);
    }

    #[test]
    fn the_demo_merchant_is_refused_with_a_real_psp() {
        let env = [
            ("PAYRAIL__PSP__PROVIDER", "stripe"),
            ("PAYRAIL__WEBHOOKS_OUT__ALLOW_PRIVATE_TARGETS", "false"),
        ];
        let r = Config::from_toml(&base(), env.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("demo_merchant")));
    }

    #[test]
    fn private_webhook_targets_are_refused_with_a_real_psp_and_off_by_default() {
        let env = [
            ("PAYRAIL__PSP__PROVIDER", "stripe"),
            ("PAYRAIL__SANDBOX__DEMO_MERCHANT", "false"),
        ];
        let r = Config::from_toml(&base(), env.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("allow_private_targets")));
        let without = base().replace("allow_private_targets = true", "");
        let c = Config::from_toml(&without, std::iter::empty()).unwrap();
        assert!(!c.webhooks_out.allow_private_targets, "off unless set");
        let short_lease = [("PAYRAIL__WEBHOOKS_OUT__CLAIM_LEASE_SECS", "5")];
        let r = Config::from_toml(&base(), short_lease.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("claim_lease_secs")));
        let slow_poll = [("PAYRAIL__WEBHOOKS_OUT__POLL_INTERVAL_MS", "20000")];
        let r = Config::from_toml(&base(), slow_poll.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("poll_interval_ms")));
    }

    #[test]
    fn unknown_keys_and_misspelt_overrides_are_refused_by_name() {
        let text = base().replace("[log]\n", "[log]\nmax_width = 100\n");
        let r = Config::from_toml(&text, std::iter::empty());
        assert!(
            matches!(&r, Err(ConfigError::Invalid(m)) if m.contains("max_width")),
            "{r:?}"
        );
        for name in [
            "PAYRAIL__SERVER__BIN",
            "PAYRAIL__SERVR__BIND",
            "PAYRAIL__PSP__SANDBOX__LATENCY",
        ] {
            let env = [(name.to_owned(), "1".to_owned())];
            let r = Config::from_toml(&base(), env.into_iter());
            assert!(
                matches!(&r, Err(ConfigError::Invalid(m)) if m.contains(name)),
                "{name}: {r:?}"
            );
        }
        let env = [("PAYRAIL__LOG__FORMAT".to_owned(), "xml".to_owned())];
        assert!(Config::from_toml(&base(), env.into_iter()).is_err());
    }

    #[test]
    fn the_public_url_follows_the_bound_address_unless_set() {
        let mut c = Config::from_toml(&base(), std::iter::empty()).unwrap().server;
        c.public_url = String::new();
        let at = |c: &ServerConfig, a: &str| c.public_url_for(a.parse().unwrap());
        assert_eq!(at(&c, "127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(at(&c, "0.0.0.0:9000"), "http://127.0.0.1:9000");
        assert_eq!(at(&c, "[::]:9000"), "http://[::1]:9000");
        assert_eq!(at(&c, "10.1.2.3:80"), "http://10.1.2.3:80");
        c.public_url = "https://pay.example.com/".into();
        assert_eq!(at(&c, "0.0.0.0:9000"), "https://pay.example.com");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml(&base(), std::iter::empty()).unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("admin_test_token") && !text.contains("whsec_") && !text.contains("postgres://"));
        assert!(!text.contains("sandbox_fingerprint_key"));
    }
}
