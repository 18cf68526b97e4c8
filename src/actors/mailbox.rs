//! Mailbox accounting. Counters are relaxed atomics: they are gauges for operators and a
//! back-pressure bound, not synchronization.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Totals for one kind of actor (`payment`, `ledger_shard`, `event_consumer`).
#[derive(Debug, Default)]
pub struct ActorStats {
    /// Messages sent and not yet taken up by a handler, summed over the kind's actors.
    pub mailbox_depth: AtomicI64,
    pub live: AtomicI64,
    pub restarts: AtomicU64,
    pub messages: AtomicU64,
}

impl ActorStats {
    pub fn depth(&self) -> i64 {
        self.mailbox_depth.load(Ordering::Relaxed)
    }

    pub fn live(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }
}

/// One actor's mailbox counter, shared by its senders (through the registry) and the actor.
#[derive(Debug)]
pub struct Mailbox {
    depth: AtomicI64,
    /// Milliseconds since the Unix epoch of the last message taken up; 0 before the first.
    last_message_ms: AtomicI64,
    kind: Arc<ActorStats>,
}

impl Mailbox {
    pub fn new(kind: Arc<ActorStats>) -> Mailbox {
        Mailbox {
            depth: AtomicI64::new(0),
            last_message_ms: AtomicI64::new(0),
            kind,
        }
    }

    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn last_message_ms(&self) -> i64 {
        self.last_message_ms.load(Ordering::Relaxed)
    }

    /// A message was put in the mailbox.
    pub fn sent(&self) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.kind.mailbox_depth.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler took a message up.
    pub fn received(&self) {
        self.left();
        self.kind.messages.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.last_message_ms.store(now, Ordering::Relaxed);
    }

    /// A message left without being handled (the actor stopped first).
    pub fn dropped(&self) {
        self.left();
    }

    fn left(&self) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.kind.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
    }
}
