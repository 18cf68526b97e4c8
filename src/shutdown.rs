//! Graceful shutdown for the background loops (event consumers, the outbox relay, the
//! sweeper): one shared signal, and a count of the loops still inside a round of work, so that
//! the process exits only once each has finished what it started, within a bound.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    stopping: AtomicBool,
    /// Loops that are running.
    running: AtomicUsize,
    changed: Notify,
}

/// Held by a running loop; dropping it counts the loop out.
pub struct Running(Shutdown);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.inner.running.fetch_sub(1, Ordering::SeqCst);
        self.0.inner.changed.notify_waiters();
    }
}

impl Shutdown {
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Tells every loop to finish its round and stop.
    pub fn begin(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.changed.notify_waiters();
    }

    /// Counts a loop in until the returned guard is dropped.
    pub fn enter(&self) -> Running {
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        Running(self.clone())
    }

    /// Sleeps for `d`, or less if shutdown begins meanwhile. True if it is stopping.
    pub async fn sleep(&self, d: Duration) -> bool {
        let changed = self.inner.changed.notified();
        if self.is_stopping() {
            return true;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(d) => {}
        }
        self.is_stopping()
    }

    /// Waits until every loop has stopped, at most `bound`. False if some were still running.
    pub async fn drained(&self, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let changed = self.inner.changed.notified();
            if self.inner.running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.inner.running.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn loops_stop_when_told_and_are_waited_for_within_the_bound() {
        let s = Shutdown::default();
        assert!(s.drained(Duration::from_millis(1)).await, "nothing runs yet");
        let guard = s.enter();
        let looping = s.clone();
        let task = actix_rt::spawn(async move {
            let _in = guard;
            while !looping.sleep(Duration::from_secs(3600)).await {}
        });
        assert!(!s.drained(Duration::from_millis(20)).await, "still running");
        s.begin();
        assert!(s.drained(Duration::from_secs(5)).await, "stopped at once");
        task.await.unwrap();
    }
}
