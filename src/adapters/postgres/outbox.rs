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

impl Db {
    /// Takes up to `limit` unpublished events (their `outbox_pending` rows locked, skipping rows
    /// another node holds), hands them to `publish`, and deletes the pending rows of the ones it
    /// returns, all in one transaction: a crash in between publishes them again, which
    /// `Nats-Msg-Id` dedupes. The event rows themselves are never written to again.
    pub async fn relay_outbox<F, Fut>(&self, limit: i64, publish: F) -> Result<usize, StoreError>
    where
        F: FnOnce(Vec<OutboxRow>) -> Fut,
        Fut: std::future::Future<Output = Vec<i64>>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let pending: Vec<i64> = tx
            .query(
                "SELECT id FROM outbox_pending ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&limit],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        // By primary key: a join is planned as a scan of the whole outbox when its statistics
        // lag behind a burst of events.
        let rows = tx
            .query(
                "SELECT id, merchant_id, event_type, body::text, payload::text, created_at
                 FROM outbox WHERE id = ANY($1) ORDER BY id",
                &[&pending],
            )
            .await
            .map_err(pg_error)?;
        let rows: Vec<OutboxRow> = rows
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
        let published = publish(rows).await;
        if !published.is_empty() {
            tx.execute("DELETE FROM outbox_pending WHERE id = ANY($1)", &[&published])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(published.len())
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
