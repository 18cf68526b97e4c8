//! `PaymentRegistry`: finds the live actor of a payment, or activates one (it loads itself
//! from PostgreSQL); bounds live actors and mailboxes; and hands a message that found its
//! actor stopping to the next incarnation, so a passivation never loses a call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::error::PaymentError;
use super::mailbox::{ActorStats, Mailbox};
use super::payment::{ActorShared, PaymentActor, PaymentCall, Reply};
use super::payment_flow::{Live, PaymentDeps};
use crate::config::ActorsConfig;
use crate::domain::PaymentId;

/// How many incarnations one call may try: a call that meets a stopping actor goes to the next.
const MAX_DELIVERY_TRIES: usize = 3;

#[derive(Clone)]
pub struct ActorEntry {
    pub addr: Addr<PaymentActor>,
    pub generation: u64,
    pub mailbox: Arc<Mailbox>,
}

pub struct PaymentRegistry {
    actors: Arc<DashMap<PaymentId, ActorEntry>>,
    /// What its actors share.
    shared: Arc<ActorShared>,
    generation: AtomicU64,
    config: ActorsConfig,
    pub stats: Arc<ActorStats>,
    /// Cluster mode: where calls for payments of other nodes' partitions go.
    forwarder: std::sync::OnceLock<Arc<super::forward::Forwarder>>,
}

impl PaymentRegistry {
    pub fn new(deps: PaymentDeps, config: ActorsConfig) -> PaymentRegistry {
        let actors = Arc::new(DashMap::new());
        let stats = Arc::new(ActorStats::default());
        PaymentRegistry {
            shared: Arc::new(ActorShared {
                deps: Arc::new(deps),
                registry: actors.clone(),
                idle_timeout: Duration::from_millis(config.idle_timeout_ms),
                // actix's own bound sits above ours, so `send` never parks a caller: ours
                // answers 503 first.
                mailbox_capacity: config.mailbox_capacity + 1,
                kind: stats.clone(),
            }),
            actors,
            generation: AtomicU64::new(1),
            config,
            stats,
            forwarder: std::sync::OnceLock::new(),
        }
    }

    /// Cluster mode: from now on, calls for payments this node does not own are forwarded.
    pub fn set_forwarder(&self, forwarder: Arc<super::forward::Forwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Cluster mode: this process as the cluster names it (`<node>/<instance>`).
    pub fn holder(&self) -> Option<Arc<str>> {
        self.forwarder.get().map(|f| f.leases.holder.clone())
    }

    /// Whether this node reads PSP-event partition `partition`: always outside cluster mode;
    /// in it, while it owns the cluster partition with that number.
    pub fn owns_partition(&self, partition: u32) -> bool {
        self.forwarder.get().is_none_or(|f| f.leases.owns(partition))
    }

    /// Cluster mode: the payment's partition is not this node's now (owned elsewhere, or
    /// between owners).
    pub fn is_elsewhere(&self, id: &PaymentId) -> bool {
        self.forwarder
            .get()
            .is_some_and(|f| !f.leases.owns(f.leases.partition_of(id.as_str())))
    }

    /// Drops the live actors of `partition`'s payments (it moved to another node). A message
    /// an actor is handling finishes; its commit is fenced by the partition's lease.
    pub fn evict_partition(&self, partition: u32) {
        let Some(f) = self.forwarder.get() else { return };
        self.actors
            .retain(|id, _| f.leases.partition_of(id.as_str()) != partition);
    }

    /// Delivers `call` to the payment's actor and waits for its answer.
    pub async fn call(&self, id: &PaymentId, call: PaymentCall) -> Result<Reply, PaymentError> {
        self.call_with(id, None, call).await
    }

    /// Like [`PaymentRegistry::call`]; an actor it has to start begins from `known` (a new
    /// payment its creator hands over, not stored yet) instead of reading PostgreSQL. Each
    /// try hands it over again: an actor that stopped after a failed creation leaves the next
    /// incarnation to start from it too.
    ///
    /// In cluster mode a payment of another node's partition is served by that node: the call
    /// is forwarded, and answered with what the owner answered.
    pub async fn call_with(
        &self,
        id: &PaymentId,
        known: Option<Live>,
        call: PaymentCall,
    ) -> Result<Reply, PaymentError> {
        if let Some(f) = self.forwarder.get() {
            let partition = f.leases.partition_of(id.as_str());
            if !f.leases.owns(partition) {
                if known.is_some() {
                    // A new payment is created where its id's partition is owned.
                    return Err(PaymentError::Unavailable(super::forward::MOVED));
                }
                return f.call(partition, id, call).await;
            }
        }
        self.call_local(id, known, call).await
    }

    /// Delivers `call` to the payment's actor on this node.
    pub async fn call_local(
        &self,
        id: &PaymentId,
        known: Option<Live>,
        call: PaymentCall,
    ) -> Result<Reply, PaymentError> {
        for _ in 0..MAX_DELIVERY_TRIES {
            let entry = self.entry(id, &mut known.clone())?;
            if entry.mailbox.depth() >= self.config.mailbox_capacity as i64 {
                return Err(PaymentError::Unavailable(crate::actors::error::MAILBOX_FULL));
            }
            entry.mailbox.sent();
            match entry.addr.send(call.clone()).await {
                Ok(reply) => return reply,
                Err(_) => {
                    // The actor stopped before taking the message up: it never ran, so it is
                    // safe to give it to a fresh incarnation.
                    entry.mailbox.dropped();
                    self.actors.remove_if(id, |_, e| e.generation == entry.generation);
                }
            }
        }
        Err(PaymentError::Unavailable(crate::actors::error::ACTOR_GONE))
    }

    fn entry(&self, id: &PaymentId, known: &mut Option<Live>) -> Result<ActorEntry, PaymentError> {
        if let Some(e) = self.actors.get(id) {
            if e.addr.connected() {
                return Ok(e.clone());
            }
        }
        if self.actors.len() >= self.config.max_live {
            return Err(PaymentError::Unavailable(crate::actors::error::TOO_MANY_LIVE));
        }
        let entry = match self.actors.entry(id.clone()) {
            Entry::Occupied(o) if o.get().addr.connected() => o.get().clone(),
            Entry::Occupied(mut o) => {
                let e = self.start(id, known.take());
                o.insert(e.clone());
                e
            }
            Entry::Vacant(v) => v.insert(self.start(id, known.take())).clone(),
        };
        Ok(entry)
    }

    fn start(&self, id: &PaymentId, known: Option<Live>) -> ActorEntry {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new(self.stats.clone()));
        let actor = PaymentActor::new(id.clone(), self.shared.clone(), mailbox.clone(), known);
        ActorEntry {
            addr: actor.start(),
            generation,
            mailbox,
        }
    }

    /// Asks every actor that looks idle to passivate, every quarter of `[actors]
    /// idle_timeout_ms`, for as long as the registry exists: one sweep instead of a timer per
    /// actor. The actor decides (it knows when its last message ended).
    pub fn spawn_passivation(self: &Arc<Self>) {
        let registry = Arc::downgrade(self);
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        let every = (idle / 4).max(Duration::from_millis(10));
        actix_rt::spawn(async move {
            loop {
                actix_rt::time::sleep(every).await;
                let Some(registry) = registry.upgrade() else { return };
                registry.ask_idle_to_passivate(idle);
            }
        });
    }

    fn ask_idle_to_passivate(&self, idle: Duration) {
        for e in self.actors.iter() {
            if e.mailbox.ask_to_passivate(idle) {
                e.addr.do_send(super::payment::Passivate);
            }
        }
    }

    /// Live actors with the deepest mailboxes first (then the most recently busy), at most `top`.
    pub fn deepest(&self, top: usize) -> Vec<(PaymentId, Arc<Mailbox>)> {
        let mut all: Vec<_> = self
            .actors
            .iter()
            .map(|e| (e.key().clone(), e.value().mailbox.clone()))
            .collect();
        all.sort_by(|a, b| {
            b.1.depth()
                .cmp(&a.1.depth())
                .then_with(|| b.1.last_message_ms().cmp(&a.1.last_message_ms()))
        });
        all.truncate(top);
        all
    }

    /// The mailbox of a live actor, without activating one.
    pub fn live_mailbox(&self, id: &PaymentId) -> Option<Arc<Mailbox>> {
        self.actors.get(id).map(|e| e.mailbox.clone())
    }

    pub fn live(&self) -> usize {
        self.actors.len()
    }

    pub fn deps(&self) -> &PaymentDeps {
        &self.shared.deps
    }
}
