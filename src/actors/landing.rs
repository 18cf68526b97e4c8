//! PSP references whose first commit is under way in this process. A PSP may announce an
//! outcome by event before payrail has stored the reference the event names: the embedded
//! sandbox's event often reaches the event consumer while the payment's commit waits for its
//! ledger batch. Without this, such an event fails its lookup and JetStream delivers it again
//! half a second later (a NAK, a redelivery and a second lookup for nearly half of all events
//! under load). With it, the consumer waits for the commit in hand before its look-up (one
//! look-up, not a miss and a second), and looks again if such a commit began after it missed.
//!
//! It only tells the consumer *when* to look again: the database's answer stays the only one
//! that routes an event.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

/// At most this many references are tracked; past it a commit is simply not announced (its
/// events fall back to redelivery). Entries live for one commit each.
const MAX_LANDING: usize = 100_000;

#[derive(Default)]
pub struct Landing {
    refs: DashMap<String, Arc<Notify>>,
}

/// Held while the commit runs; dropping it ends the wait of any consumer looking for it.
pub struct Landed<'a> {
    landing: &'a Landing,
    reference: String,
    notify: Arc<Notify>,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        self.landing
            .refs
            .remove_if(&self.reference, |_, n| Arc::ptr_eq(n, &self.notify));
        self.notify.notify_waiters();
    }
}

impl Landing {
    /// A commit that stores `reference` for the first time begins.
    pub fn begin(&self, reference: &str) -> Option<Landed<'_>> {
        if self.refs.len() >= MAX_LANDING {
            return None;
        }
        let notify = Arc::new(Notify::new());
        self.refs.insert(reference.to_owned(), notify.clone());
        Some(Landed {
            landing: self,
            reference: reference.to_owned(),
            notify,
        })
    }

    /// If a commit storing `reference` is under way, waits until it ends (at most `bound`) and
    /// says true: look again. False at once otherwise.
    pub async fn wait(&self, reference: &str, bound: Duration) -> bool {
        let Some(notify) = self.refs.get(reference).map(|e| e.value().clone()) else {
            return false;
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before looking again, so an end between the two is not missed.
        notified.as_mut().enable();
        if self
            .refs
            .get(reference)
            .is_some_and(|e| Arc::ptr_eq(e.value(), &notify))
        {
            let _ = tokio::time::timeout(bound, notified).await;
        }
        true
    }

    pub fn len(&self) -> usize {
        self.refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_the_commit_ends_and_not_before() {
        let landing = Arc::new(Landing::default());
        assert!(!landing.wait("pi_1", Duration::from_secs(5)).await, "nothing under way");
        let guard = landing.begin("pi_1").unwrap();
        let waiter = {
            let landing = landing.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                (landing.wait("pi_1", Duration::from_secs(5)).await, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "it waits while the commit runs");
        drop(guard);
        let (looked, waited) = waiter.await.unwrap();
        assert!(looked);
        assert!(waited < Duration::from_secs(5), "woken by the end, not the bound");
        assert!(landing.is_empty());
    }

    #[tokio::test]
    async fn a_wait_is_bounded() {
        let landing = Landing::default();
        let _guard = landing.begin("pi_2").unwrap();
        let started = tokio::time::Instant::now();
        assert!(landing.wait("pi_2", Duration::from_millis(30)).await);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
