//! `LedgerShard`: group commit. Each shard owns the merchants that hash to it (and its own
//! balance slot of every account). Commits that arrive while it writes are gathered — at most
//! `[ledger] max_batch`, waiting at most `[ledger] max_wait_us` for company — and written in
//! ONE transaction; then every waiting actor is answered. A batch that fails is retried commit
//! by commit, so one bad commit fails alone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::mailbox::{ActorStats, Mailbox};
use crate::adapters::postgres::commit::{Commit, CommitError};
use crate::adapters::postgres::Db;
use crate::config::LedgerConfig;

/// Batch sizes in power-of-two buckets (1, 2–3, 4–7, … 2048+), and commit times.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    /// Batches that failed whole and were retried commit by commit.
    pub split_batches: AtomicU64,
    pub size_buckets: [AtomicU64; 12],
    /// Σ seconds spent in batch transactions, in microseconds.
    pub commit_micros: AtomicU64,
}

impl LedgerStats {
    fn record(&self, size: usize, took: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commits.fetch_add(size as u64, Ordering::Relaxed);
        let bucket = (usize::BITS - size.max(1).leading_zeros() - 1).min(11) as usize;
        self.size_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.commit_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// `(lower bound of the bucket, batches)` for every non-empty bucket.
    pub fn size_distribution(&self) -> Vec<(usize, u64)> {
        self.size_buckets
            .iter()
            .enumerate()
            .map(|(i, n)| (1usize << i, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), CommitError>")]
struct Submit(Commit);

struct Queued {
    commit: Commit,
    reply: oneshot::Sender<Result<(), CommitError>>,
}

pub struct LedgerShard {
    slot: i16,
    db: Db,
    max_batch: usize,
    max_wait: Duration,
    queue: VecDeque<Queued>,
    /// Batches being written now. What arrives meanwhile waits for the next one.
    writing: usize,
    /// How many batches may be written at once: while one waits for its WAL flush, the next
    /// executes. Safe because a payment never has two commits in flight (its actor awaits each).
    max_in_flight: usize,
    /// A gathering pause is scheduled.
    gathering: bool,
    stats: Arc<LedgerStats>,
    metrics: Arc<crate::metrics::Metrics>,
    kind: Arc<ActorStats>,
    /// Order ids the sandbox's ledger fault drill already panicked for.
    drill: Arc<dashmap::DashMap<String, ()>>,
}

/// Whether a failed batch of `n` commits is written again commit by commit, so that one bad
/// commit fails alone. Not when its COMMIT went unanswered ([`CommitError::Unknown`]): the
/// batch may have landed, and a commit written a second time after landing could pass again
/// where it checks only the payment's version (one that moves nothing) and be answered for as
/// if the first had failed. Every commit of it is told its fate is unknown, and each flow
/// reloads its payment and resumes by key (docs/DESIGN.md, "Ambiguous commits"). A failure
/// before the COMMIT (a statement refused, a deadlock, a timeout, a connection lost mid-way)
/// rolled the batch back: it is split.
fn split_after(e: &CommitError, n: usize) -> bool {
    n > 1 && !matches!(e, CommitError::Unknown)
}

/// The sandbox-only supervision drill: a commit of a sandbox payment made with
/// `sandbox::LEDGER_PANIC_ONCE` panics inside the batch, once per order id.
fn fault_drill(drill: &dashmap::DashMap<String, ()>, commits: &[&Commit]) {
    use crate::adapters::psp::sandbox::LEDGER_PANIC_ONCE;
    for p in commits.iter().filter_map(|c| c.payment.as_ref()) {
        if p.psp == "sandbox" && p.payment_method == LEDGER_PANIC_ONCE && drill.insert(p.order_id.clone(), ()).is_none()
        {
            panic!("sandbox: {LEDGER_PANIC_ONCE} panics once inside a ledger batch");
        }
    }
}

impl Actor for LedgerShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The router bounds what waits here; actix's own bound must never park a sender.
        ctx.set_mailbox_capacity(usize::MAX >> 1);
    }
}

impl Handler<Submit> for LedgerShard {
    type Result = ResponseFuture<Result<(), CommitError>>;

    fn handle(&mut self, msg: Submit, ctx: &mut Self::Context) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Queued { commit: msg.0, reply });
        self.kick(ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(CommitError::Unavailable("ledger"))) })
    }
}

impl LedgerShard {
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.gathering || self.writing >= self.max_in_flight || self.queue.is_empty() {
            return;
        }
        if self.queue.len() < self.max_batch && !self.max_wait.is_zero() {
            // Give the commits that are on their way a moment to share this transaction.
            self.gathering = true;
            ctx.run_later(self.max_wait, |act, ctx| {
                act.gathering = false;
                act.write(ctx);
                act.kick(ctx);
            });
        } else {
            self.write(ctx);
            self.kick(ctx);
        }
    }

    fn write(&mut self, ctx: &mut Context<Self>) {
        if self.writing >= self.max_in_flight || self.queue.is_empty() {
            return;
        }
        self.writing += 1;
        let n = self.queue.len().min(self.max_batch);
        let batch: Vec<Queued> = self.queue.drain(..n).collect();
        let (db, slot, stats, metrics) = (self.db.clone(), self.slot, self.stats.clone(), self.metrics.clone());
        let drill = self.drill.clone();
        let work = async move {
            let started = Instant::now();
            let commits: Vec<&Commit> = batch.iter().map(|q| &q.commit).collect();
            fault_drill(&drill, &commits);
            let result = db.commit_batch(&commits, slot).await;
            stats.record(batch.len(), started.elapsed());
            metrics.ledger_batch(batch.len(), started.elapsed());
            metrics.handled("ledger_shard", started.elapsed());
            match result {
                Ok(()) => batch.into_iter().for_each(|q| drop(q.reply.send(Ok(())))),
                Err(e) if !split_after(&e, batch.len()) => {
                    batch.into_iter().for_each(|q| drop(q.reply.send(Err(e.clone()))))
                }
                Err(e) => {
                    tracing::info!(size = batch.len(), error = %e, "batch failed; committing one by one");
                    stats.split_batches.fetch_add(1, Ordering::Relaxed);
                    for q in batch {
                        let r = db.commit_batch(&[&q.commit], slot).await;
                        let _ = q.reply.send(r);
                    }
                }
            }
        };
        // A panic must not take the shard down: the batch's callers get 503 (their replies are
        // dropped, the transaction rolls back) and the shard goes on with the next batch.
        let work = AssertUnwindSafe(work).catch_unwind();
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| {
            if result.is_err() {
                tracing::error!(
                    slot = act.slot,
                    "ledger shard panicked in a batch; its commits were refused"
                );
                act.kind.restarts.fetch_add(1, Ordering::Relaxed);
            }
            act.writing -= 1;
            act.kick(ctx);
        }));
    }
}

struct Shard {
    addr: Addr<LedgerShard>,
    mailbox: Arc<Mailbox>,
}

/// The ledger's front door: routes each commit to the shard of its journal's home account
/// (the merchant's) and bounds what may wait there.
pub struct Ledger {
    shards: Vec<Shard>,
    max_pending: i64,
    pub stats: Arc<LedgerStats>,
    pub kind: Arc<ActorStats>,
}

/// Marks a commit as taken up when its caller stops waiting, however that happens.
struct Received<'a>(&'a Mailbox);

impl Drop for Received<'_> {
    fn drop(&mut self) {
        self.0.received("commit");
    }
}

/// The shard of a home account (a merchant id).
pub fn shard_of(key: &str, shards: usize) -> usize {
    (crate::domain::ids::stable_hash(key) % shards.max(1) as u64) as usize
}

impl Ledger {
    /// Starts the shards, spread over their own arbiters (threads) so that no shard shares a
    /// thread with the HTTP workers' actors.
    pub fn start(db: &Db, config: &LedgerConfig, metrics: Arc<crate::metrics::Metrics>) -> Ledger {
        let stats = Arc::new(LedgerStats::default());
        let kind = Arc::new(ActorStats::default());
        let threads = config.threads.clamp(1, config.shards.max(1));
        let drill = Arc::new(dashmap::DashMap::new());
        let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
        let shards = (0..config.shards.max(1))
            .map(|i| {
                let shard = LedgerShard {
                    slot: i as i16,
                    db: db.clone(),
                    max_batch: config.max_batch.max(1),
                    max_wait: Duration::from_micros(config.max_wait_us),
                    queue: VecDeque::new(),
                    writing: 0,
                    max_in_flight: config.batches_in_flight.max(1),
                    gathering: false,
                    stats: stats.clone(),
                    metrics: metrics.clone(),
                    kind: kind.clone(),
                    drill: drill.clone(),
                };
                kind.live.fetch_add(1, Ordering::Relaxed);
                let addr = LedgerShard::start_in_arbiter(&arbiters[i % threads].handle(), move |_| shard);
                Shard {
                    addr,
                    mailbox: Arc::new(Mailbox::new(kind.clone())),
                }
            })
            .collect();
        Ledger {
            shards,
            max_pending: config.max_pending as i64,
            stats,
            kind,
        }
    }

    /// Commits `c` in the next batch of its shard; returns once it is durable.
    pub async fn commit(&self, c: Commit) -> Result<(), CommitError> {
        let home = c.payment.as_ref().map(|p| p.merchant_id.as_str()).unwrap_or_default();
        let shard = &self.shards[shard_of(home, self.shards.len())];
        if shard.mailbox.depth() >= self.max_pending {
            return Err(CommitError::Unavailable("ledger (shard queue full)"));
        }
        shard.mailbox.sent();
        // Counted out even if this caller goes away while its commit waits.
        let _left = Received(&shard.mailbox);
        let result = shard.addr.send(Submit(c)).await;
        result.unwrap_or(Err(CommitError::Unavailable("ledger")))
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Each shard's mailbox: commits waiting, last message, recent messages.
    pub fn mailboxes(&self) -> Vec<Arc<Mailbox>> {
        self.shards.iter().map(|s| s.mailbox.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::postgres::StoreError;

    #[test]
    fn a_batch_whose_fate_is_unknown_is_never_written_again() {
        // No answer to the COMMIT: it may have landed; every commit is told so, none rerun.
        assert!(!split_after(&CommitError::Unknown, 25));
        // A statement refused, a deadlock or a lost connection before the COMMIT, a lost race,
        // a key held: nothing landed; one by one, so that only the commit at fault fails.
        for e in [
            CommitError::Store(StoreError::Unavailable),
            CommitError::Store(StoreError::Broken),
            CommitError::Stale,
            CommitError::KeyHeld,
            CommitError::Fenced,
        ] {
            assert!(split_after(&e, 25), "{e}");
            assert!(!split_after(&e, 1), "one commit is its own answer: {e}");
        }
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("mer_abc", 4), shard_of("mer_abc", 4));
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[shard_of(&format!("mer_{i:032x}"), 4)] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
    }

    #[test]
    fn batch_sizes_fall_in_power_of_two_buckets() {
        let s = LedgerStats::default();
        for size in [1, 2, 3, 4, 100, 5000] {
            s.record(size, Duration::from_micros(10));
        }
        assert_eq!(s.size_distribution(), vec![(1, 1), (2, 2), (4, 1), (64, 1), (2048, 1)]);
    }
}
