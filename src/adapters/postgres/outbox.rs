//! The outbox: events committed with the changes they report, published to NATS afterwards.

use serde_json::value::RawValue;

use super::{pg_error, Db, StoreError};

/// One committed event waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub merchant_id: String,
    pub event_type: String,
    /// As stored (compacted, for an event stored as jsonb): published without being parsed.
    pub payload: Box<RawValue>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The relay's transaction-scoped advisory lock: one node relays at a time (the node lock is
/// 7423002, the migration lock 7423001). Taking it gives the round no transaction id of its own.
const RELAY_LOCK: i64 = 7_423_003;

/// A relay round's first statement: the relay's lock, and the planner's settings for the
/// round's read, which must walk the `outbox_relay` index from the cursor and stop at its
/// limit. A new database's statistics make a bitmap scan and a sort look cheaper, which would
/// read every event after the cursor (all of them, after an outage of NATS) per round. And
/// each statement's generic plan, made once per connection (as `commit::PLANNER` says why).
pub const RELAY_BEGIN: &str = "SELECT pg_try_advisory_xact_lock($1),
        set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true),
        set_config('plan_cache_mode', 'force_generic_plan', true)";

/// The cursor, read by a statement of its own once the lock is held: a statement's snapshot is
/// taken before it runs, so one that also took the lock could read the cursor as it was before
/// the previous holder's round committed.
const RELAY_CURSOR: &str = "SELECT tx::text, id, tx >= pg_snapshot_xmax(pg_current_snapshot()) FROM outbox_cursor";

/// The cursor moved past the events a round published.
const RELAY_ADVANCE: &str = "UPDATE outbox_cursor SET tx = $1::text::xid8, id = $2";

/// The events after the relay's cursor, in its order, each with whether every transaction up to
/// its own has ended. On the `outbox_relay` index, the cursor's position its condition.
pub const RELAY_READ: &str = "SELECT id, merchant_id, event_type, body::text, payload::text, created_at,
        tx::text AS position, tx < pg_snapshot_xmin(pg_current_snapshot())
    FROM outbox WHERE tx IS NOT NULL AND (tx, id) > ($1::text::xid8, $2)
    ORDER BY tx, id LIMIT $3";

/// One relay round's outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Events published and passed by the cursor.
    pub published: usize,
    /// Events committed after the cursor but held back: an older transaction still runs, so a
    /// later round publishes them (in transaction order) once it has ended.
    pub held: bool,
    /// NATS acknowledged fewer events than the round took: the rest wait for a later round.
    pub failed: bool,
    /// Another node's relay holds the cursor.
    pub busy: bool,
}

impl Db {
    /// Publishes up to `limit` events after the relay's cursor (migration V22) and moves the
    /// cursor past those published, all in one transaction under the relay's lock.
    ///
    /// Only events of transactions older than every transaction still running are taken
    /// (`tx < pg_snapshot_xmin`): those have ended, and every event written from now on, by a
    /// transaction running or not yet begun, has a higher `tx`, so none can ever land behind
    /// the cursor. The cursor moves in `(tx, id)` order; the events a round takes are
    /// published in id order, the order in which their rows were written (a transaction that
    /// took its id first may have written its event after another that committed before it,
    /// and both become ready together). A crash before COMMIT, or a publish that failed
    /// part-way, publishes some again, which `Nats-Msg-Id` dedupes. The event rows themselves
    /// are never written to.
    pub async fn relay_outbox<F, Fut>(&self, limit: i64, publish: F) -> Result<Relayed, StoreError>
    where
        F: FnOnce(Vec<OutboxRow>) -> Fut,
        Fut: std::future::Future<Output = Vec<i64>>,
    {
        let mut client = self.client().await?;
        // Prepared once per connection: a statement sent as text is parsed, planned and
        // described again each time, a round trip more per statement, at every round.
        let prepare = |sql| client.prepare_cached(sql);
        let (begin, cursor, read, advance) = (
            prepare(RELAY_BEGIN).await.map_err(pg_error)?,
            prepare(RELAY_CURSOR).await.map_err(pg_error)?,
            prepare(RELAY_READ).await.map_err(pg_error)?,
            prepare(RELAY_ADVANCE).await.map_err(pg_error)?,
        );
        let tx = client.transaction().await.map_err(pg_error)?;
        let locked: bool = tx.query_one(&begin, &[&RELAY_LOCK]).await.map_err(pg_error)?.get(0);
        if !locked {
            return Ok(Relayed {
                busy: true,
                ..Relayed::default()
            });
        }
        let cursor = tx.query_one(&cursor, &[]).await.map_err(pg_error)?;
        let (after_tx, after_id): (String, i64) = (cursor.get(0), cursor.get(1));
        if cursor.get::<_, bool>(2) {
            // Written by transactions this cluster has not reached: the database was copied
            // from another cluster, and every later event would land behind the cursor. A
            // node rebases it when it starts ([`Db::outbox_rebase`]); until then, nothing.
            tracing::error!(
                cursor = %after_tx,
                "the outbox cursor names a transaction this PostgreSQL cluster has not reached (a copied \
                 database?): events are not published until a payrail node restarts and rebases it"
            );
            return Err(StoreError::Broken);
        }
        // Ordered by (tx, id), the events of ended transactions come first; the first one of a
        // transaction still older than a running one ends the batch.
        let rows = tx
            .query(&read, &[&after_tx, &after_id, &limit])
            .await
            .map_err(pg_error)?;
        let ready = rows.iter().take_while(|r| r.get::<_, bool>(7)).count();
        let held = ready < rows.len();
        if ready == 0 {
            return Ok(Relayed {
                held,
                ..Relayed::default()
            });
        }
        // In cursor order: each event's id and position.
        let positions: Vec<(i64, String)> = rows[..ready].iter().map(|r| (r.get(0), r.get(6))).collect();
        let mut events: Vec<OutboxRow> = rows[..ready]
            .iter()
            .map(|r| {
                // `body` is the text payrail wrote (compact); `payload`, of events written
                // before V20, is jsonb's text, with spaces.
                let text = match (r.get::<_, Option<String>>(3), r.get::<_, Option<&str>>(4)) {
                    (Some(body), _) => body,
                    (None, Some(payload)) => crate::domain::webhook::compact_json(payload),
                    (None, None) => return Err(StoreError::Broken),
                };
                Ok(OutboxRow {
                    id: r.get(0),
                    merchant_id: r.get(1),
                    event_type: r.get(2),
                    payload: RawValue::from_string(text).map_err(|_| StoreError::Broken)?,
                    created_at: r.get(5),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        events.sort_unstable_by_key(|e| e.id);
        let published: std::collections::HashSet<i64> = publish(events).await.into_iter().collect();
        // The cursor passes the longest run, in its order, of events all published; any
        // published beyond it are published again by a later round.
        let passed = positions.iter().take_while(|(id, _)| published.contains(id)).count();
        let Some((last_id, last_tx)) = passed.checked_sub(1).map(|i| &positions[i]) else {
            return Ok(Relayed {
                held,
                failed: true,
                ..Relayed::default()
            });
        };
        tx.execute(&advance, &[last_tx, last_id]).await.map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Relayed {
            published: passed,
            held,
            failed: passed < ready,
            busy: false,
        })
    }

    /// The oldest transaction of the PostgreSQL cluster that holds a transaction id, for the
    /// relay's warning when events wait long: its process, database, state and age.
    pub async fn oldest_writer(&self) -> Result<String, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT format('pid %s, database %s, %s, transaction %s, open %s s', pid, datname, state,
                               backend_xid, extract(epoch FROM now() - xact_start)::bigint)
                 FROM pg_stat_activity WHERE backend_xid IS NOT NULL ORDER BY age(backend_xid) DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.map(|r| r.get(0)).unwrap_or_default())
    }

    /// Makes the relay's cursor this cluster's again after the database was copied from another
    /// PostgreSQL cluster (a logical dump and restore, logical replication), whose transaction
    /// ids the events and the cursor still carry: every event written here would sort behind
    /// the cursor and never be published. Run at start, before this node writes anything: the
    /// events the cursor had passed keep no transaction (published, like events written before
    /// V22), those it had not come first (`tx` 1), and the cursor starts again. Returns whether
    /// there was anything to do.
    pub async fn outbox_rebase(&self) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let foreign: bool = tx
            .query_one(
                "SELECT tx >= pg_snapshot_xmax(pg_current_snapshot()) FROM outbox_cursor FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if !foreign {
            return Ok(false);
        }
        tx.batch_execute(
            "UPDATE outbox o SET tx = NULL FROM outbox_cursor c WHERE o.tx IS NOT NULL AND (o.tx, o.id) <= (c.tx, c.id);
             UPDATE outbox SET tx = '1' WHERE tx IS NOT NULL;
             UPDATE outbox_cursor SET tx = '0', id = 0;",
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }
}

/// Writes an event of no payment (an account's, a transfer's) in the caller's transaction.
pub(super) async fn insert_event(
    tx: &tokio_postgres::Transaction<'_>,
    merchant: &str,
    kind: &str,
    payload: &serde_json::Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO outbox (merchant_id, event_type, body) VALUES ($1, $2, $3)",
        &[&merchant, &kind, payload],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}
