//! Group commit for small writes that many requests make at once and that each need in their
//! own transaction (the idempotency key's claim, the sandbox's booking), and for small reads
//! on the PSP-event path. One request's row alone is a statement, a transaction and a WAL
//! flush; under load the rows that arrive while one batch is written go together in the next,
//! as one multi-row statement in one transaction. Each caller still waits for its own batch's
//! commit (or read) before it goes on, and a read starts after its callers asked. What
//! differs from a statement of its own: an error of the statement (a lost connection, a
//! deadlock, a timeout) is every row's answer in the batch, and a caller whose wait ran out is
//! told the database is unavailable although its row may still land (as after any lost answer).
//!
//! No task runs while the group is idle: the first row to find no batch under way starts a
//! writer on the runtime of the caller, which writes batches until the queue is empty.
//! Bounded: at most `max_batch` rows per statement, at most `max_queued` rows waiting (past
//! it, the caller is told at once that the database is unavailable), at most `MAX_WRITE` per
//! batch, and no row waits longer than `MAX_WAIT` for its answer. A row whose caller stopped
//! waiting is not written. A writer whose runtime goes away frees the group and fails the
//! rows still queued at once.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::StoreError;

/// The longest a row waits for its batch's answer before it is told the database is
/// unavailable.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// The longest one batch may take; past it, the batch's callers are told the database is
/// unavailable and the writer goes on with the next.
const MAX_WRITE: std::time::Duration = std::time::Duration::from_secs(10);

/// One row waiting for its batch, and where its answer goes.
pub struct Waiting<T, R> {
    pub row: T,
    pub answer: oneshot::Sender<Result<R, StoreError>>,
}

pub struct Group<T, R> {
    queue: Mutex<Queue<T, R>>,
    max_batch: usize,
    max_queued: usize,
    /// [`MAX_WRITE`] and [`MAX_WAIT`]; shorter in tests.
    max_write: std::time::Duration,
    max_wait: std::time::Duration,
}

struct Queue<T, R> {
    rows: Vec<Waiting<T, R>>,
    writing: bool,
}

impl<T: Send + 'static, R: Send + 'static> Group<T, R> {
    pub fn new(max_batch: usize, max_queued: usize) -> Group<T, R> {
        Group {
            queue: Mutex::new(Queue {
                rows: Vec::new(),
                writing: false,
            }),
            max_batch: max_batch.max(1),
            max_queued: max_queued.max(1),
            max_write: MAX_WRITE,
            max_wait: MAX_WAIT,
        }
    }

    /// Queues `row` and waits for its batch's answer. `write` writes one batch and answers
    /// every row of it; a row it leaves unanswered (a dropped sender) is told the database is
    /// unavailable. Every caller of one group passes the same `write`: the caller that starts
    /// a writer lends it its own for the batches that follow.
    pub async fn submit<W, F>(self: &std::sync::Arc<Self>, row: T, write: W) -> Result<R, StoreError>
    where
        W: Fn(Vec<Waiting<T, R>>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.rows.len() >= self.max_queued {
                return Err(StoreError::Unavailable);
            }
            q.rows.push(Waiting { row, answer });
            !std::mem::replace(&mut q.writing, true)
        };
        if start {
            // Its own task: a caller that goes away (its client disconnected) must not take the
            // batch, and everyone waiting behind it, with it. The guard is made before the
            // task, so a task dropped before it ever ran frees the group too.
            let free = Free {
                group: self.clone(),
                done: false,
            };
            tokio::spawn(async move { free.drain(write).await });
        }
        // Bounded, whatever happens to the writer.
        match tokio::time::timeout(self.max_wait, answered).await {
            Ok(answer) => answer.unwrap_or(Err(StoreError::Unavailable)),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

/// The writer's hold on its group. Dropped before the queue was emptied (the writer's
/// runtime shut down, before or during a batch), it frees the group and tells the rows still
/// queued, at once, that the database is unavailable: nothing was written for them.
struct Free<T, R> {
    group: std::sync::Arc<Group<T, R>>,
    done: bool,
}

impl<T, R> Drop for Free<T, R> {
    fn drop(&mut self) {
        if !self.done {
            let mut q = self.group.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.writing = false;
            q.rows.clear();
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Free<T, R> {
    async fn drain<W, F>(mut self, write: W)
    where
        W: Fn(Vec<Waiting<T, R>>) -> F,
        F: Future<Output = ()>,
    {
        loop {
            let batch = {
                let mut q = self.group.queue.lock().unwrap_or_else(|p| p.into_inner());
                // A row whose caller stopped waiting (its bound ran out) is not written.
                q.rows.retain(|w| !w.answer.is_closed());
                if q.rows.is_empty() {
                    q.writing = false;
                    self.done = true;
                    return;
                }
                let n = q.rows.len().min(self.group.max_batch);
                q.rows.drain(..n).collect::<Vec<_>>()
            };
            // A batch waits for a pooled connection and runs statements with timeouts of their
            // own; a connection that goes silent must not hold the group beyond this. Its
            // callers are then told the database is unavailable (the batch may have landed,
            // as after any lost answer).
            let _ = tokio::time::timeout(self.group.max_write, write(batch)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn rows_that_arrive_together_share_a_batch_and_each_gets_its_own_answer() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(4, 100));
        let batches = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::new();
        for i in 0..10u32 {
            let (group, batches) = (group.clone(), batches.clone());
            calls.push(tokio::spawn(async move {
                group
                    .submit(i, move |rows| {
                        let batches = batches.clone();
                        async move {
                            assert!(rows.len() <= 4, "a batch never exceeds max_batch");
                            batches.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            for w in rows {
                                let _ = w.answer.send(Ok(w.row * 10));
                            }
                        }
                    })
                    .await
            }));
        }
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap().unwrap(), i as u32 * 10);
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(
            (3..10).contains(&n),
            "ten rows in batches of at most four, some shared: {n}"
        );
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_an_unanswered_row_is_unavailable() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(1, 1));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let first = {
            let (group, released) = (group.clone(), released.clone());
            tokio::spawn(async move {
                group
                    .submit(1, move |rows| {
                        let released = released.clone();
                        async move {
                            if let Some(r) = released.lock().await.take() {
                                let _ = r.await;
                            }
                            drop(rows); // never answered
                        }
                    })
                    .await
            })
        };
        // Wait until the writer has taken the first row, then fill the queue.
        loop {
            let taken = {
                let q = group.queue.lock().unwrap();
                q.writing && q.rows.is_empty()
            };
            if taken {
                break;
            }
            tokio::task::yield_now().await;
        }
        let second = {
            let group = group.clone();
            tokio::spawn(async move { group.submit(2, |rows| async move { drop(rows) }).await })
        };
        while group.queue.lock().unwrap().rows.is_empty() {
            tokio::task::yield_now().await;
        }
        let third = group.submit(3, |rows| async move { drop(rows) }).await;
        assert!(
            matches!(third, Err(StoreError::Unavailable)),
            "past max_queued: refused at once"
        );
        release.send(()).unwrap();
        assert!(matches!(first.await.unwrap(), Err(StoreError::Unavailable)));
        assert!(matches!(second.await.unwrap(), Err(StoreError::Unavailable)));
    }

    #[test]
    fn a_writer_whose_runtime_ends_mid_batch_frees_the_group() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(8, 100));
        let taken = |g: &Group<u32, u32>| {
            let q = g.queue.lock().unwrap();
            q.writing && q.rows.is_empty()
        };
        {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let g = group.clone();
            rt.block_on(async {
                let stuck = tokio::spawn(async move {
                    g.submit(1, |rows| {
                        drop(rows);
                        std::future::pending::<()>()
                    })
                    .await
                });
                while !taken(&group) {
                    tokio::task::yield_now().await;
                }
                drop(stuck);
            });
            // The runtime goes, and its writer task with it, in the middle of a batch.
        }
        assert!(!group.queue.lock().unwrap().writing, "the group is free again");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answer = rt.block_on(group.submit(2, |rows| async move {
            for w in rows {
                let _ = w.answer.send(Ok(w.row));
            }
        }));
        assert_eq!(answer.unwrap(), 2, "the next row starts a writer of its own");
    }

    #[test]
    fn a_writer_dropped_before_it_ran_frees_the_group_and_fails_what_was_queued() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(8, 100));
        {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let first = group.submit(1, |rows| async move { drop(rows) });
                tokio::pin!(first);
                // Queued, and its writer spawned but not yet run.
                assert!(futures_util::FutureExt::now_or_never(first.as_mut()).is_none());
                assert!(group.queue.lock().unwrap().writing);
            });
            // The runtime goes before the writer ever ran.
        }
        let q = group.queue.lock().unwrap();
        assert!(!q.writing && q.rows.is_empty(), "freed, and nothing left queued");
    }

    #[tokio::test]
    async fn a_row_whose_caller_stopped_waiting_is_not_written() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(1, 100));
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let write = {
            let written = written.clone();
            move |rows: Vec<Waiting<u32, u32>>| {
                let (written, released) = (written.clone(), released.clone());
                async move {
                    if let Some(r) = released.lock().await.take() {
                        let _ = r.await;
                    }
                    for w in rows {
                        written.lock().unwrap().push(w.row);
                        let _ = w.answer.send(Ok(w.row));
                    }
                }
            }
        };
        let first = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(1, write).await })
        };
        let state = |g: &Group<u32, u32>| {
            let q = g.queue.lock().unwrap();
            (q.rows.len(), q.writing)
        };
        while state(&group) != (0, true) {
            tokio::task::yield_now().await;
        }
        {
            // A second row, queued behind the first batch, whose caller then gives up.
            let second = group.submit(2, write.clone());
            tokio::pin!(second);
            assert!(futures_util::FutureExt::now_or_never(second.as_mut()).is_none());
        }
        let third = {
            let (group, write) = (group.clone(), write.clone());
            tokio::spawn(async move { group.submit(3, write).await })
        };
        while state(&group).0 < 2 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(third.await.unwrap().unwrap(), 3);
        assert_eq!(*written.lock().unwrap(), vec![1, 3], "the abandoned row was skipped");
    }

    #[tokio::test]
    async fn a_batch_that_never_ends_is_answered_unavailable_and_the_writer_goes_on() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group {
            max_write: std::time::Duration::from_millis(50),
            ..Group::new(1, 100)
        });
        // The first batch's connection goes silent: its write never ends.
        let write = |rows: Vec<Waiting<u32, u32>>| async move {
            if rows.iter().any(|w| w.row == 1) {
                std::future::pending::<()>().await;
            }
            for w in rows {
                let _ = w.answer.send(Ok(w.row));
            }
        };
        let first = {
            let group = group.clone();
            tokio::spawn(async move { group.submit(1, write).await })
        };
        let second = {
            let group = group.clone();
            tokio::spawn(async move { group.submit(2, write).await })
        };
        let started = std::time::Instant::now();
        assert!(matches!(first.await.unwrap(), Err(StoreError::Unavailable)));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "bounded by the batch, not the wait"
        );
        assert_eq!(second.await.unwrap().unwrap(), 2, "the next batch is written");
    }
}
