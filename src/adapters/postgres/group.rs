//! Group commit for small writes that many requests make at once and that each need in their
//! own transaction: the idempotency key's claim, the sandbox's booking. One request's row
//! alone is a statement, a transaction and a WAL flush; under load the rows that arrive while
//! one batch is written go together in the next, as one multi-row statement in one
//! transaction. Each caller still waits for its own row's commit before it goes on: what it
//! is told is exactly what a single-row statement would have told it.
//!
//! No task runs while the group is idle: the first row to find no batch under way starts a
//! writer on the runtime of the caller, which writes batches until the queue is empty.
//! Bounded: at most `max_batch` rows per statement, at most `max_queued` rows waiting (past
//! it, the caller is told at once that the database is unavailable: 503), and no row waits
//! longer than `MAX_WAIT` for its answer.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::StoreError;

/// The longest a row waits for its batch's answer before it is told the database is
/// unavailable.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// One row waiting for its batch, and where its answer goes.
pub struct Waiting<T, R> {
    pub row: T,
    pub answer: oneshot::Sender<Result<R, StoreError>>,
}

pub struct Group<T, R> {
    queue: Mutex<Queue<T, R>>,
    max_batch: usize,
    max_queued: usize,
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
            // batch, and everyone waiting behind it, with it.
            let group = self.clone();
            tokio::spawn(async move { group.drain(write).await });
        }
        // Bounded, whatever happens to the writer: a batch waits for a pooled connection and
        // one statement, each with its own timeout, so this is only ever reached by a writer
        // whose runtime went away.
        match tokio::time::timeout(MAX_WAIT, answered).await {
            Ok(answer) => answer.unwrap_or(Err(StoreError::Unavailable)),
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    async fn drain<W, F>(&self, write: W)
    where
        W: Fn(Vec<Waiting<T, R>>) -> F,
        F: Future<Output = ()>,
    {
        // A writer dropped mid-batch (its runtime shut down) leaves the group free for the
        // next row to start another.
        struct Free<'a, T, R>(&'a Group<T, R>, bool);
        impl<T, R> Drop for Free<'_, T, R> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.queue.lock().unwrap_or_else(|p| p.into_inner()).writing = false;
                }
            }
        }
        let mut free = Free(self, false);
        loop {
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.rows.is_empty() {
                    q.writing = false;
                    free.1 = true;
                    return;
                }
                let n = q.rows.len().min(self.max_batch);
                q.rows.drain(..n).collect::<Vec<_>>()
            };
            write(batch).await;
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
}
