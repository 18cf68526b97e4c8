//! Mailbox accounting. Counters are relaxed atomics: they are gauges for operators and a
//! back-pressure bound, not synchronization.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

/// Milliseconds since the Unix epoch from a monotonic clock: the wall clock read once, then
/// advanced by `Instant`, so that a step of the wall clock neither holds passivation back nor
/// hurries it.
fn now_ms() -> i64 {
    static ORIGIN: OnceLock<(Instant, i64)> = OnceLock::new();
    let (at, epoch_ms) = ORIGIN.get_or_init(|| {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (Instant::now(), epoch_ms)
    });
    epoch_ms + at.elapsed().as_millis() as i64
}

/// How many recent messages a mailbox remembers for operators.
pub const RECENT: usize = 20;

/// One actor's mailbox counter, shared by its senders (through the registry) and the actor.
#[derive(Debug)]
pub struct Mailbox {
    depth: AtomicI64,
    /// Milliseconds since the Unix epoch of the last message taken up or finished (payment
    /// actors say when they finish one); 0 before the first.
    last_message_ms: AtomicI64,
    /// The actor's own status, as an index its kind defines (`UNKNOWN` until it says).
    status: AtomicU8,
    /// A passivation request is on its way to the actor: the sweep does not send another.
    passivation_asked: std::sync::atomic::AtomicBool,
    /// The last `RECENT` messages taken up: their type and time, never their content. A std
    /// Mutex: held for one push, never across an await.
    recent: Mutex<VecDeque<(&'static str, i64)>>,
    kind: Arc<ActorStats>,
}

impl Mailbox {
    pub const UNKNOWN: u8 = u8::MAX;

    pub fn new(kind: Arc<ActorStats>) -> Mailbox {
        Mailbox {
            depth: AtomicI64::new(0),
            last_message_ms: AtomicI64::new(0),
            status: AtomicU8::new(Mailbox::UNKNOWN),
            passivation_asked: std::sync::atomic::AtomicBool::new(false),
            // Grown as messages come (most payments see a handful), never past RECENT.
            recent: Mutex::new(VecDeque::new()),
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

    /// A handler took a message of type `name` up.
    pub fn received(&self, name: &'static str) {
        self.left();
        self.kind.messages.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        self.last_message_ms.store(now, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        } else if recent.len() == recent.capacity() {
            let more = recent.capacity().max(2).min(RECENT - recent.len());
            recent.reserve_exact(more);
        }
        recent.push_back((name, now));
    }

    /// A message left without being handled (the actor stopped first).
    pub fn dropped(&self) {
        self.left();
    }

    fn left(&self) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.kind.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
    }

    /// A handler finished now: the actor was busy until now.
    pub fn touch(&self) {
        self.last_message_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether nothing was taken up or finished for `idle`. A mailbox that never saw a message
    /// is idle: an actor is sent its first message as it starts, and one the sweep stops
    /// before it took that message up hands it to the next incarnation, as any stopping actor
    /// does.
    pub fn idle_for(&self, idle: std::time::Duration) -> bool {
        now_ms() - self.last_message_ms() >= idle.as_millis() as i64
    }

    /// Whether the actor looks idle for `idle` (nothing waiting, no message taken up or finished since)
    /// and has not been asked to passivate yet; if so, it counts as asked from now on.
    pub fn ask_to_passivate(&self, idle: std::time::Duration) -> bool {
        self.depth() == 0 && self.idle_for(idle) && !self.passivation_asked.swap(true, Ordering::Relaxed)
    }

    /// The actor handled a passivation request (and stayed, or stops).
    pub fn passivation_answered(&self) {
        self.passivation_asked.store(false, Ordering::Relaxed);
    }

    pub fn set_status(&self, status: u8) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Relaxed)
    }

    /// The recent messages, oldest first.
    pub fn recent(&self) -> Vec<(&'static str, i64)> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_in_and_out_per_actor_and_per_kind() {
        let kind = Arc::new(ActorStats::default());
        let (a, b) = (Mailbox::new(kind.clone()), Mailbox::new(kind.clone()));
        a.sent();
        a.sent();
        b.sent();
        assert_eq!((a.depth(), b.depth(), kind.depth()), (2, 1, 3));
        a.received("capture");
        b.dropped();
        assert_eq!((a.depth(), b.depth(), kind.depth()), (1, 0, 1));
        assert_eq!(a.recent().iter().map(|r| r.0).collect::<Vec<_>>(), ["capture"]);
    }

    #[test]
    fn an_idle_actor_is_asked_to_passivate_once_until_it_answers() {
        use std::time::Duration;
        let m = Mailbox::new(Arc::new(ActorStats::default()));
        let hour = Duration::from_secs(3600);
        assert!(m.ask_to_passivate(Duration::ZERO), "idle: asked");
        assert!(!m.ask_to_passivate(Duration::ZERO), "one request on its way at a time");
        m.passivation_answered();
        assert!(m.ask_to_passivate(Duration::ZERO), "asked again once it answered");
        m.passivation_answered();
        m.sent();
        assert!(!m.ask_to_passivate(Duration::ZERO), "a message waits");
        m.received("capture");
        m.touch();
        assert!(!m.ask_to_passivate(hour), "busy within the hour");
        assert!(m.idle_for(Duration::ZERO) && !m.idle_for(hour));
    }

    #[test]
    fn recent_messages_are_bounded() {
        let m = Mailbox::new(Arc::new(ActorStats::default()));
        for _ in 0..(RECENT + 5) {
            m.sent();
            m.received("sync");
        }
        assert_eq!(m.recent().len(), RECENT);
        // Grown on demand, never past the bound (an idle actor holds only what it saw).
        let capacity = m.recent.lock().unwrap().capacity();
        assert!((RECENT..RECENT + 4).contains(&capacity), "{capacity}");
        let fresh = Mailbox::new(Arc::new(ActorStats::default()));
        assert_eq!(fresh.recent.lock().unwrap().capacity(), 0);
    }
}
