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

/// A relay round's first statement: the relay's lock, the cursor, and the planner's settings
/// for the round's read, which must walk the `outbox_relay` index from the cursor and stop at
/// its limit. A new database's statistics make a bitmap scan and a sort look cheaper, which
/// would read every event after the cursor (all of them, after an outage of NATS) per round.
pub const RELAY_BEGIN: &str = "SELECT pg_try_advisory_xact_lock($1), tx::text, id,
        set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)
    FROM outbox_cursor";

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
    /// Another node's relay holds the cursor.
    pub busy: bool,
}

impl Db {
    /// Publishes up to `limit` events after the relay's cursor (migration V22), in the order
    /// of the transactions that wrote them, then of their ids, and moves the cursor past those
    /// `publish` returns, all in one transaction under the relay's lock.
    ///
    /// Only events of transactions older than every transaction still running are taken
    /// (`tx < pg_snapshot_xmin`): those have ended, and every event written from now on, by a
    /// transaction running or not yet begun, has a higher `tx`, so none can ever land behind
    /// the cursor. A crash before COMMIT publishes them again, which `Nats-Msg-Id` dedupes.
    /// The event rows themselves are never written to.
    pub async fn relay_outbox<F, Fut>(&self, limit: i64, publish: F) -> Result<Relayed, StoreError>
    where
        F: FnOnce(Vec<OutboxRow>) -> Fut,
        Fut: std::future::Future<Output = Vec<i64>>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let cursor = tx.query_one(RELAY_BEGIN, &[&RELAY_LOCK]).await.map_err(pg_error)?;
        if !cursor.get::<_, bool>(0) {
            return Ok(Relayed {
                busy: true,
                ..Relayed::default()
            });
        }
        let (after_tx, after_id): (String, i64) = (cursor.get(1), cursor.get(2));
        // Ordered by (tx, id), the events of ended transactions come first; the first one of a
        // transaction still older than a running one ends the batch.
        let rows = tx
            .query(RELAY_READ, &[&after_tx, &after_id, &limit])
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
        let positions: Vec<(i64, String)> = rows[..ready].iter().map(|r| (r.get(0), r.get(6))).collect();
        let events: Vec<OutboxRow> = rows[..ready]
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
        let published = publish(events).await;
        // `publish` acknowledges a prefix of the events, in order: the cursor moves to its last.
        let Some(last) = published.last() else {
            return Ok(Relayed {
                held,
                ..Relayed::default()
            });
        };
        let Some((_, last_tx)) = positions.iter().find(|(id, _)| id == last) else {
            return Err(StoreError::Broken);
        };
        tx.execute(
            "UPDATE outbox_cursor SET tx = $1::text::xid8, id = $2",
            &[last_tx, last],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Relayed {
            published: published.len(),
            held,
            busy: false,
        })
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
