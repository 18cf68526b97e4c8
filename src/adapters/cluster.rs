//! Cluster mode (docs/DESIGN.md, "Growing past one machine"): payments map onto a fixed number
//! of partitions, and each partition is owned by one live node through a lease in a NATS KV
//! bucket, `{prefix}_CLUSTER`.
//!
//! - `p.<n>` holds partition n's lease: the owner's node id. A node takes a free partition with
//!   a revision-checked `create` (only one node can create a key), renews it every `[cluster]
//!   renew_every_ms` with a revision-checked `update`, and gives it up with a revision-checked
//!   delete. The bucket's `max_age` is the lease TTL: a key nobody renews disappears, and the
//!   partition is free again.
//! - `n.<node>` says a node is alive and where it serves (`NodeInfo`), renewed the same way.
//!
//! The create's revision is the lease's fence. Before a node serves a partition it writes
//! `(revision, holder)` into `partition_fences`; every commit a payment actor makes in cluster
//! mode carries its partition's fence and the database refuses it unless the row still holds it
//! (`commit::FENCE`). The TTL decides who may take over; the database decides who may write.
//!
//! A node that cannot renew stops serving a partition one renewal period before its lease can
//! expire elsewhere: a node cut off from NATS fails closed rather than race its successor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::adapters::nats::{Nats, NatsError};
use crate::adapters::postgres::Db;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

const PARTITION_KEY: &str = "p.";
const NODE_KEY: &str = "n.";
/// The most one KV operation of the lease loop may take before the round goes on without it.
const KV_TIMEOUT: Duration = Duration::from_millis(800);

/// What a node says about itself in `n.<node>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    /// This process: a node restarted under the same id is another instance.
    pub instance: String,
    /// Where its HTTP API is reached.
    pub url: String,
    pub started_at: String,
}

/// A KV entry as the watch last saw it.
#[derive(Debug, Clone)]
struct Seen<T> {
    value: T,
    /// When this node received it: its own clock, so a peer's or the server's clock being off
    /// never makes a live lease look expired (a lease may only look alive a little longer).
    at: Instant,
}

#[derive(Default)]
struct View {
    owners: Vec<Option<Seen<Arc<str>>>>,
    nodes: BTreeMap<Arc<str>, Seen<NodeInfo>>,
}

/// The fence a commit carries: its partition, and the lease this node holds on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    pub partition: i32,
    pub revision: i64,
    pub holder: Arc<str>,
}

/// Who owns what, as this node knows it; shared by the lease loop, the registry (routing), the
/// store (fences) and the event consumers (which partitions to read).
pub struct Leases {
    pub node: Arc<str>,
    /// `<node>/<instance>`: what `partition_fences.holder` holds for this process.
    pub holder: Arc<str>,
    pub info: NodeInfo,
    count: u32,
    ttl: Duration,
    /// The revision of this node's lease on each partition (its fence); 0 where it holds none.
    owned: Box<[AtomicI64]>,
    /// Until when (milliseconds since `epoch`) this node may serve each partition: one renewal
    /// period before its lease could expire elsewhere, however late the lease keeper runs.
    serve_until: Box<[AtomicU64]>,
    epoch: Instant,
    view: RwLock<View>,
    /// The watch has delivered what the bucket held when it started (cleared when it breaks).
    current: std::sync::atomic::AtomicBool,
    /// When the watch last delivered an entry (milliseconds since `epoch`). Every node's own
    /// renewals come through it each round, so a healthy watch is never silent for a lease's
    /// time to live.
    last_seen: AtomicU64,
}

/// One partition as `/admin/v1/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: u32,
    pub owner: Option<String>,
}

impl Leases {
    pub fn new(config: &ClusterConfig, url: String) -> Leases {
        let node: Arc<str> = if config.node_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-"))
                .unwrap_or_else(|_| "node".into());
            format!("{host}-{}", std::process::id()).into()
        } else {
            config.node_id.as_str().into()
        };
        let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let count = config.partitions.max(1);
        Leases {
            holder: format!("{node}/{instance}").into(),
            info: NodeInfo {
                node: node.to_string(),
                instance,
                url,
                started_at: crate::domain::record::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            },
            node,
            count,
            ttl: Duration::from_millis(config.lease_ttl_ms),
            owned: (0..count).map(|_| AtomicI64::new(0)).collect(),
            serve_until: (0..count).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            view: RwLock::new(View {
                owners: vec![None; count as usize],
                nodes: BTreeMap::new(),
            }),
            current: std::sync::atomic::AtomicBool::new(false),
            last_seen: AtomicU64::new(0),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.count
    }

    /// The partition of a payment (by its id).
    pub fn partition_of(&self, key: &str) -> u32 {
        (crate::domain::ids::stable_hash(key) % u64::from(self.count)) as u32
    }

    pub fn owns(&self, partition: u32) -> bool {
        self.fence(partition).is_some()
    }

    pub fn owned(&self) -> usize {
        (0..self.count).filter(|&p| self.owns(p)).count()
    }

    fn fence(&self, partition: u32) -> Option<i64> {
        let r = self.owned.get(partition as usize)?.load(Ordering::Acquire);
        let until = self.serve_until[partition as usize].load(Ordering::Acquire);
        (r > 0 && self.millis(Instant::now()) < until).then_some(r)
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A renewal sent at `sent` succeeded: the lease lives at least `ttl` past it, and this
    /// node serves until one renewal period (`margin`) before that.
    fn renewed(&self, partition: u32, sent: Instant, margin: Duration) {
        let until = self.millis(sent + self.ttl.saturating_sub(margin));
        self.serve_until[partition as usize].store(until, Ordering::Release);
    }

    /// The fence for a commit of this payment, or `None` if this node does not own its partition.
    pub fn token(&self, payment: &str) -> Option<LeaseToken> {
        let partition = self.partition_of(payment);
        self.fence(partition).map(|revision| LeaseToken {
            partition: partition as i32,
            revision,
            holder: self.holder.clone(),
        })
    }

    /// The live node that owns `partition` (this one included), as the watch last saw it.
    pub fn owner(&self, partition: u32) -> Option<Arc<str>> {
        if self.owns(partition) {
            return Some(self.node.clone());
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.owners
            .get(partition as usize)?
            .as_ref()
            .filter(|s| self.fresh(s.at))
            .map(|s| node_of(&s.value).into())
    }

    /// Live nodes (this one always among them), with what they say about themselves.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let mut nodes: Vec<NodeInfo> = view
            .nodes
            .values()
            .filter(|s| self.fresh(s.at) && s.value.node != *self.node)
            .map(|s| s.value.clone())
            .collect();
        nodes.push(self.info.clone());
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }

    /// The processes (`<node>/<instance>`) of the live nodes, this one included; `None` while
    /// this node's view cannot be trusted to name them all (its watch broke or fell silent:
    /// NATS unreachable from here). A node cut off from NATS sees every other node's entries
    /// age out and would take them for gone: what is decided by departure (a key taken over
    /// from a process that left, a reconciliation run failed) waits for a trusted view.
    pub fn holders(&self) -> Option<Vec<String>> {
        self.view_trusted().then(|| {
            self.nodes()
                .into_iter()
                .map(|n| format!("{}/{}", n.node, n.instance))
                .collect()
        })
    }

    /// Whether the watch is caught up and has delivered within a lease's time to live.
    fn view_trusted(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.current.load(Ordering::Acquire)
            && now.saturating_sub(self.last_seen.load(Ordering::Acquire)) < self.ttl.as_millis() as u64
    }

    /// The watch delivered an entry; `current`: it has caught up with the bucket.
    fn note_seen(&self, current: bool) {
        self.last_seen
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        if current {
            self.current.store(true, Ordering::Release);
        }
    }

    /// The watch broke: until it is open and caught up again, the view is not trusted.
    fn watch_broken(&self) {
        self.current.store(false, Ordering::Release);
    }

    /// Every partition with its live owner, if it has one.
    pub fn map(&self) -> Vec<PartitionView> {
        (0..self.count)
            .map(|p| PartitionView {
                partition: p,
                owner: self.owner(p).map(|o| o.to_string()),
            })
            .collect()
    }

    /// Whether every partition has a live owner: any payment can be served.
    pub fn complete(&self) -> bool {
        (0..self.count).all(|p| self.owner(p).is_some())
    }

    /// An entry this node received at `at` is still a live lease. A lease may outlive this by
    /// the server's expiry sweep; a `create` on it then fails and is tried again next round.
    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.ttl
    }

    fn set_owned(&self, partition: u32, revision: i64) {
        self.owned[partition as usize].store(revision, Ordering::Release);
    }

    fn saw(&self, entry: &kv::Entry) {
        let at = Instant::now();
        let put = matches!(entry.operation, kv::Operation::Put);
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = entry
            .key
            .strip_prefix(PARTITION_KEY)
            .and_then(|p| p.parse::<usize>().ok())
        {
            if let Some(slot) = view.owners.get_mut(p) {
                *slot = match std::str::from_utf8(&entry.value) {
                    Ok(holder) if put => Some(Seen {
                        value: holder.into(),
                        at,
                    }),
                    _ => None,
                };
            }
        } else if let Some(node) = entry.key.strip_prefix(NODE_KEY) {
            match serde_json::from_slice::<NodeInfo>(&entry.value) {
                Ok(info) if put => {
                    view.nodes.insert(node.into(), Seen { value: info, at });
                }
                _ => {
                    view.nodes.remove(node);
                }
            }
            // Nodes gone for long (restarts under `<host>-<pid>` ids) are forgotten: bounded.
            let ttl = self.ttl;
            view.nodes.retain(|_, s| s.at.elapsed() < ttl * 20);
        }
        drop(view);
        self.note_seen(entry.seen_current);
    }
}

/// The node part of a holder (`<node>/<instance>`).
fn node_of(holder: &str) -> &str {
    holder.split_once('/').map_or(holder, |(node, _)| node)
}

/// The lease bucket's name.
pub fn bucket(prefix: &str) -> String {
    format!("{prefix}_CLUSTER")
}

/// What every node of one cluster must agree on, kept in the lease bucket's description when
/// the first node creates it; a node started with other settings is refused.
fn settings(config: &ClusterConfig) -> String {
    format!(
        "payrail partition leases and live nodes: partitions={} lease_ttl_ms={}",
        config.partitions, config.lease_ttl_ms
    )
}

/// Opens (or creates) the lease bucket: history 1, `max_age` = the lease TTL. The bucket's
/// stream is made as the KV convention shapes it, by hand: the client's own `create_key_value`
/// first asks for account details in a form nats-server 2.9 does not answer. A bucket made by
/// nodes with another partition count or TTL refuses this node: one payment must map to one
/// partition, and a lease must expire when every node thinks it does.
pub async fn open_bucket(nats: &Nats, config: &ClusterConfig, replicas: usize) -> Result<kv::Store, NatsError> {
    // A cluster of nats-servers just started (or busy electing its leaders) may time out the
    // first requests: tried again, a bounded number of times, as the streams are.
    let mut tries = 0;
    loop {
        match open_bucket_once(nats, config, replicas).await {
            Err(NatsError::JetStream(e)) if tries < BUCKET_SETUP_TRIES => {
                tries += 1;
                tracing::warn!(error = %e, tries, "the lease bucket is not ready; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            opened => return opened,
        }
    }
}

/// How often opening the lease bucket is tried at start.
const BUCKET_SETUP_TRIES: u32 = 20;

async fn open_bucket_once(nats: &Nats, config: &ClusterConfig, replicas: usize) -> Result<kv::Store, NatsError> {
    use async_nats::jetstream::stream;
    let name = bucket(&nats.prefix);
    let wanted = settings(config);
    let made = nats
        .jetstream
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            description: Some(wanted.clone()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age: Duration::from_millis(config.lease_ttl_ms),
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::JetStream(e.to_string()))?;
    let found = made.cached_info().config.description.clone().unwrap_or_default();
    if found != wanted || made.cached_info().config.max_age != Duration::from_millis(config.lease_ttl_ms) {
        return Err(NatsError::Settings(format!(
            "the cluster's lease bucket KV_{name} was made with other settings ({found}); this node has \
             [cluster] partitions = {} and lease_ttl_ms = {}: every node of a cluster must agree",
            config.partitions, config.lease_ttl_ms
        )));
    }
    nats.jetstream
        .get_key_value(name)
        .await
        .map_err(|e| NatsError::JetStream(e.to_string()))
}

/// Called with a partition this node stops serving (given up or lost), so that its live
/// actors are dropped before another node's actors take the payments over.
pub type OnLost = Box<dyn Fn(u32) + Send + Sync>;

/// A lease this node holds.
struct Held {
    /// The key's latest revision (renewals move it).
    revision: u64,
    /// When the last renewal that succeeded was sent: the lease lives at least `ttl` past it.
    renewed: Instant,
}

/// Keeps this node's leases: watches the bucket, renews, takes free partitions and gives up
/// extra ones until each live node holds its share, and gives everything back on shutdown.
pub struct LeaseKeeper {
    pub leases: Arc<Leases>,
    pub kv: kv::Store,
    pub db: Db,
    pub config: ClusterConfig,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub on_lost: OnLost,
}

/// Every this many rounds (10 s at 500 ms), runs of departed nodes are looked for.
const DEPARTED_RUNS_EVERY: u64 = 20;

/// How long a fence write waits for a row lock (batches of the previous holder under way)
/// before the take is given up and tried again next round.
const TAKE_LOCK_TIMEOUT_MS: u64 = 1_000;

impl LeaseKeeper {
    /// Runs until shutdown, then releases every lease it holds.
    pub async fn run(self) {
        let _running = self.shutdown.enter();
        let watch = tokio::spawn(watch(self.kv.clone(), self.leases.clone(), self.shutdown.clone()));
        let every = Duration::from_millis(self.config.renew_every_ms);
        // The first round rebalances against the bucket as it is, not an empty view (an empty
        // bucket delivers nothing, hence the bound).
        let empty = matches!(self.kv.stream.clone().info().await, Ok(i) if i.state.messages == 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !empty && !self.leases.current.load(Ordering::Acquire) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut held: HashMap<u32, Held> = HashMap::new();
        for n in 1u64.. {
            self.round(&mut held, n).await;
            if self.shutdown.sleep(every).await {
                break;
            }
        }
        self.release_all(&mut held).await;
        watch.abort();
    }

    fn margin(&self) -> Duration {
        Duration::from_millis(self.config.renew_every_ms)
    }

    async fn round(&self, held: &mut HashMap<u32, Held>, n: u64) {
        let started = Instant::now();
        let leases = &self.leases;
        let holder = leases.holder.as_bytes().to_vec();
        let info = serde_json::to_vec(&leases.info).unwrap_or_default();
        let _ = tokio::time::timeout(
            KV_TIMEOUT,
            self.kv.put(format!("{NODE_KEY}{}", leases.node), info.into()),
        )
        .await;
        // Renew everything at once.
        let renewals = futures_util::future::join_all(held.iter().map(|(&p, h)| {
            let kv = &self.kv;
            let value = holder.clone();
            async move {
                let r = tokio::time::timeout(KV_TIMEOUT, kv.update(key(p), value.into(), h.revision)).await;
                (p, r)
            }
        }))
        .await;
        for (p, r) in renewals {
            match r {
                Ok(Ok(revision)) => {
                    if let Some(h) = held.get_mut(&p) {
                        h.revision = revision;
                        h.renewed = started;
                        leases.renewed(p, started, self.margin());
                    }
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // A renewal that timed out here may have landed: the key still holds this
                    // process, at a revision we did not see. Adopt it (the deadline is not
                    // extended: the next renewal does that).
                    match tokio::time::timeout(KV_TIMEOUT, self.kv.entry(key(p))).await {
                        Ok(Ok(Some(e)))
                            if matches!(e.operation, kv::Operation::Put) && e.value.as_ref() == holder.as_slice() =>
                        {
                            if let Some(h) = held.get_mut(&p) {
                                h.revision = e.revision;
                            }
                        }
                        _ => {
                            tracing::warn!(
                                partition = p,
                                "partition lease taken by another node; stopped serving it"
                            );
                            self.drop_partition(held, p, "lost");
                        }
                    }
                }
                // NATS slow or unreachable: the lease may still be ours; the deadline below decides.
                _ => {}
            }
        }
        // Fail closed: stop serving one renewal period before the lease could expire elsewhere
        // (`Leases::owns` already refuses past that deadline; this drops the actors too).
        let ttl = Duration::from_millis(self.config.lease_ttl_ms);
        let expiring: Vec<u32> = held
            .iter()
            .filter(|(_, h)| h.renewed.elapsed() + self.margin() >= ttl)
            .map(|(&p, _)| p)
            .collect();
        for p in expiring {
            tracing::error!(
                partition = p,
                "partition lease not renewed in time (NATS unreachable?); stopped serving it"
            );
            self.drop_partition(held, p, "lost");
        }
        self.rebalance(held, started).await;
        // Now and then, with a complete view of the live nodes: the reconciliation runs of
        // processes that left the cluster are failed (they will never finish).
        let live = n
            .is_multiple_of(DEPARTED_RUNS_EVERY)
            .then(|| leases.holders())
            .flatten();
        if let Some(live) = live {
            match self.db.fail_departed_runs(&live).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    runs = n,
                    "reconciliation runs of nodes that left the cluster were failed"
                ),
                Err(e) => tracing::warn!(error = %e, "reconciliation runs of departed nodes could not be closed"),
            }
        }
    }

    /// Takes free partitions up to this node's share, or gives up what is above it, at most
    /// `max_moves` per round.
    async fn rebalance(&self, held: &mut HashMap<u32, Held>, started: Instant) {
        let leases = &self.leases;
        let count = leases.partitions() as usize;
        let nodes = leases.nodes().len().max(1);
        let share = count.div_ceil(nodes);
        let moves = self.config.max_moves;
        if held.len() > share {
            let mut mine: Vec<u32> = held.keys().copied().collect();
            mine.sort_unstable();
            for p in mine.into_iter().rev().take((held.len() - share).min(moves)) {
                let revision = held.get(&p).map(|h| h.revision);
                self.drop_partition(held, p, "released");
                if let Some(revision) = revision {
                    let _ =
                        tokio::time::timeout(KV_TIMEOUT, self.kv.delete_expect_revision(key(p), Some(revision))).await;
                }
            }
            return;
        }
        if held.len() >= share {
            return;
        }
        // Free partitions, starting at a place of this node's own so that nodes joining together
        // do not all race for the same ones.
        let start = (crate::domain::ids::stable_hash(&leases.node) % count as u64) as usize;
        let free: Vec<u32> = (0..count)
            .map(|i| ((start + i) % count) as u32)
            .filter(|&p| !held.contains_key(&p) && leases.owner(p).is_none())
            .take((share - held.len()).min(moves))
            .collect();
        // Several at once: one slow fence write (a lock held by the previous holder's batch)
        // does not hold up the others, nor the next renewals for long.
        let taken = futures_util::future::join_all(free.into_iter().map(|p| self.take(p))).await;
        for (p, revision) in taken.into_iter().flatten() {
            held.insert(
                p,
                Held {
                    revision,
                    renewed: started,
                },
            );
            leases.renewed(p, started, self.margin());
            leases.set_owned(p, revision as i64);
            self.metrics.cluster_move("acquired");
            tracing::info!(partition = p, revision, "partition lease taken");
        }
    }

    /// Creates `p`'s lease and writes its fence; the partition and the lease's revision, or
    /// `None` if another node has it or the fence could not be written (the lease is then
    /// given back).
    async fn take(&self, p: u32) -> Option<(u32, u64)> {
        let holder = self.leases.holder.as_bytes().to_vec();
        let created = tokio::time::timeout(KV_TIMEOUT, self.kv.create(key(p), holder.into())).await;
        let Ok(Ok(revision)) = created else { return None };
        // The fence first: from this commit on, the previous holder can no longer write, and
        // commits it had under way are done (they held the row FOR SHARE). A fence of a newer
        // revision is never overwritten, unless the bucket itself was made again since (its
        // revisions restarted below the fence's).
        let fence = |force| {
            self.db.take_partition(
                p as i32,
                revision as i64,
                &self.leases.holder,
                force,
                TAKE_LOCK_TIMEOUT_MS,
            )
        };
        let outcome = match fence(false).await {
            Ok(None) => Ok(()),
            Ok(Some(newer)) => match self.kv.stream.clone().info().await {
                Ok(info) if (newer as u64) > info.state.last_sequence => {
                    fence(true).await.map(|_| ()).map_err(|e| e.to_string())
                }
                _ => Err(format!("a newer fence (revision {newer}) holds it")),
            },
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => Some((p, revision)),
            Err(why) => {
                tracing::warn!(partition = p, %why, "partition fence not written; lease given back");
                let _ = tokio::time::timeout(KV_TIMEOUT, self.kv.delete_expect_revision(key(p), Some(revision))).await;
                None
            }
        }
    }

    fn drop_partition(&self, held: &mut HashMap<u32, Held>, p: u32, why: &'static str) {
        held.remove(&p);
        self.leases.set_owned(p, 0);
        (self.on_lost)(p);
        self.metrics.cluster_move(why);
    }

    /// On shutdown: stop serving each partition, then delete its lease so that another node
    /// takes it at once rather than after the TTL.
    async fn release_all(&self, held: &mut HashMap<u32, Held>) {
        let all: Vec<(u32, u64)> = held.iter().map(|(&p, h)| (p, h.revision)).collect();
        for &(p, _) in &all {
            self.drop_partition(held, p, "released");
        }
        futures_util::future::join_all(all.into_iter().map(|(p, revision)| {
            tokio::time::timeout(KV_TIMEOUT, self.kv.delete_expect_revision(key(p), Some(revision)))
        }))
        .await;
        let _ = tokio::time::timeout(KV_TIMEOUT, self.kv.delete(format!("{NODE_KEY}{}", self.leases.node))).await;
        tracing::info!("partition leases given back");
    }
}

fn key(partition: u32) -> String {
    format!("{PARTITION_KEY}{partition}")
}

/// Keeps `leases`' view of the bucket current; a broken watch is opened again.
async fn watch(kv: kv::Store, leases: Arc<Leases>, shutdown: Shutdown) {
    while !shutdown.is_stopping() {
        // With history: the bucket's current entries first, then every change.
        match kv.watch_with_history(">").await {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    match entry {
                        Ok(e) => leases.saw(&e),
                        Err(e) => {
                            tracing::warn!(error = %e, "cluster lease watch");
                            break;
                        }
                    }
                }
                leases.watch_broken();
            }
            Err(e) => {
                leases.watch_broken();
                tracing::warn!(error = %e, "cluster lease watch could not start")
            }
        }
        shutdown.sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(ttl_ms: u64) -> Leases {
        Leases::new(
            &ClusterConfig {
                enabled: true,
                node_id: "n1".into(),
                partitions: 8,
                lease_ttl_ms: ttl_ms,
                ..ClusterConfig::default()
            },
            "http://127.0.0.1:1".into(),
        )
    }

    #[test]
    fn departures_are_decided_only_on_a_view_that_is_caught_up_and_fresh() {
        let l = leases(3_000);
        assert_eq!(l.holders(), None, "not caught up yet");
        l.note_seen(false);
        assert_eq!(l.holders(), None, "still not caught up");
        l.note_seen(true);
        assert_eq!(l.holders().map(|h| h.len()), Some(1), "this node");
        l.watch_broken();
        assert_eq!(l.holders(), None, "the watch broke");
        l.note_seen(true);
        assert!(l.holders().is_some());
        // A watch silent for a lease's time to live (NATS unreachable from here).
        let quick = leases(1);
        quick.note_seen(true);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(quick.holders(), None, "silent for longer than a lease lives");
    }

    #[test]
    fn a_payment_always_maps_to_the_same_partition_in_range() {
        let l = leases(3_000);
        for i in 0..1_000 {
            let id = format!("pay_{i:032}");
            let p = l.partition_of(&id);
            assert!(p < 8);
            assert_eq!(p, l.partition_of(&id));
        }
    }

    #[test]
    fn a_lease_is_served_only_until_one_renewal_period_before_it_could_expire() {
        let l = leases(3_000);
        let margin = Duration::from_millis(500);
        assert!(!l.owns(3) && l.token("x").is_none());
        l.set_owned(3, 41);
        // Owned, but never renewed: not served.
        assert!(!l.owns(3));
        l.renewed(3, Instant::now(), margin);
        assert!(l.owns(3));
        assert_eq!(l.owned(), 1);
        // Renewed 2.6 s ago: within a renewal period of the TTL, so no longer served, whatever
        // the lease keeper is doing.
        l.renewed(3, Instant::now() - Duration::from_millis(2_600), margin);
        assert!(!l.owns(3));
        l.renewed(3, Instant::now() - Duration::from_millis(2_400), margin);
        assert!(l.owns(3));
        // Given up: not served, however fresh.
        l.set_owned(3, 0);
        assert!(!l.owns(3));
    }

    #[test]
    fn a_commit_s_token_names_its_partition_the_lease_revision_and_this_process() {
        let l = leases(3_000);
        let id = "pay_0123456789abcdef0123456789abcdef";
        let p = l.partition_of(id);
        l.set_owned(p, 77);
        l.renewed(p, Instant::now(), Duration::from_millis(500));
        let t = l.token(id).expect("owned");
        assert_eq!((t.partition, t.revision), (p as i32, 77));
        assert!(t.holder.starts_with("n1/") && t.holder.len() > 3);
        // Another process with the same node id is another holder.
        assert_ne!(leases(3_000).holder, l.holder);
    }
}
