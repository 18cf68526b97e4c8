//! `OutboxRelay`: publishes committed outbox rows to `{prefix}.events.<merchant>` on the
//! `{prefix}_EVENTS` stream, in id order, `Nats-Msg-Id` = `outbox-<id>`, and marks them sent.
//! Downstream consumers are at-least-once and idempotent (docs/DESIGN.md). Bounded: `BATCH` rows
//! a round; with NATS or PostgreSQL down it backs off (capped) and catches up afterwards.

use std::time::Duration;

use crate::adapters::nats::Nats;
use crate::adapters::postgres::outbox::OutboxRow;
use crate::adapters::postgres::Db;

const BATCH: i64 = 500;
const IDLE: Duration = Duration::from_millis(200);

pub fn spawn(db: Db, nats: Nats, shutdown: crate::shutdown::Shutdown) {
    actix_rt::spawn(async move {
        let _running = shutdown.enter();
        let mut backoff = IDLE;
        while !shutdown.is_stopping() {
            let nats_ref = &nats;
            let round = db
                .relay_outbox(BATCH, |rows| async move {
                    let mut sent = Vec::with_capacity(rows.len());
                    for row in rows {
                        if publish(nats_ref, &row).await.is_err() {
                            // Keep id order: stop at the first failure; the rest waits.
                            break;
                        }
                        sent.push(row.id);
                    }
                    sent
                })
                .await;
            backoff = match round {
                Ok(n) if n as i64 == BATCH => Duration::ZERO,
                Ok(_) => IDLE,
                Err(_) => (backoff * 2).clamp(IDLE, Duration::from_secs(5)),
            };
            if !backoff.is_zero() && shutdown.sleep(backoff).await {
                break;
            }
        }
    });
}

async fn publish(nats: &Nats, row: &OutboxRow) -> Result<(), String> {
    let subject = format!("{}.events.{}", nats.prefix, row.merchant_id);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("outbox-{}", row.id).as_str());
    headers.insert("Payrail-Event-Type", row.event_type.as_str());
    // The event exactly as merchants read and receive it (docs/API.md, "Events").
    let event = crate::domain::webhook::event_object(row.id, &row.event_type, row.created_at, &row.payload);
    let payload = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
    let ack = nats
        .jetstream
        .publish_with_headers(subject, headers, payload.into())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(2), ack)
        .await
        .map_err(|_| "ack timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
