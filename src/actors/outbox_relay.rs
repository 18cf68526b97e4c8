//! `OutboxRelay`: publishes committed outbox rows to `{prefix}.events.<merchant>` on the
//! `{prefix}_EVENTS` stream, in the order of the transactions that wrote them and pipelined,
//! `Nats-Msg-Id` = `outbox-<id>`, and moves its cursor past the acknowledged ones. A commit that
//! writes outbox rows wakes it; otherwise it polls. Events that an older, still running
//! transaction holds back are looked at again within milliseconds. Downstream consumers are
//! at-least-once and idempotent (docs/DESIGN.md). Bounded: `BATCH` rows a round; with NATS or
//! PostgreSQL down it backs off (capped) and catches up afterwards.

use std::time::Duration;

use crate::adapters::nats::Nats;
use crate::adapters::postgres::outbox::{OutboxRow, Relayed};
use crate::adapters::postgres::Db;

const BATCH: i64 = 500;
const IDLE: Duration = Duration::from_millis(200);
/// The first wait for a transaction that holds committed events back (a batch in flight ends
/// within milliseconds); doubled while the same wait goes on, up to [`HELD_MAX`].
const HELD_MIN: Duration = Duration::from_millis(1);
const HELD_MAX: Duration = Duration::from_millis(100);

pub fn spawn(db: Db, nats: Nats, shutdown: crate::shutdown::Shutdown) {
    actix_rt::spawn(async move {
        let _running = shutdown.enter();
        let mut backoff = IDLE;
        let mut held = HELD_MIN;
        while !shutdown.is_stopping() {
            let nats_ref = &nats;
            let round = db
                .relay_outbox(BATCH, |rows| async move { publish_in_order(nats_ref, &rows).await })
                .await;
            if !matches!(
                round,
                Ok(Relayed {
                    held: true,
                    published: 0,
                    ..
                })
            ) {
                held = HELD_MIN;
            }
            backoff = match round {
                Ok(r) if r.published as i64 == BATCH => Duration::ZERO,
                // Events wait behind a transaction still running: look again soon, or as soon
                // as a commit writes events (often the very transaction that held them).
                Ok(r) if r.held => {
                    let wait = held;
                    held = (held * 2).min(HELD_MAX);
                    tokio::select! {
                        _ = db.outbox_wait(wait) => {}
                        _ = shutdown.sleep(wait) => {}
                    }
                    continue;
                }
                Ok(_) => IDLE,
                Err(_) => (backoff * 2).clamp(IDLE, Duration::from_secs(5)),
            };
            if backoff == IDLE {
                // Woken by the next commit that writes outbox rows, or polls after IDLE (a row
                // committed by another node, or one this round could not publish).
                tokio::select! {
                    _ = db.outbox_wait(IDLE) => {}
                    _ = shutdown.sleep(IDLE) => {}
                }
            } else if !backoff.is_zero() && shutdown.sleep(backoff).await {
                break;
            }
        }
    });
}

/// Publishes `rows` pipelined (every publish sent, then the acknowledgements awaited) and
/// returns the ids acknowledged before the first failure: the rows after it wait for the next
/// round, and republishing one JetStream already stored is dropped by its `Nats-Msg-Id`.
async fn publish_in_order(nats: &Nats, rows: &[OutboxRow]) -> Vec<i64> {
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        match publish(nats, row).await {
            Ok(ack) => acks.push((row.id, ack)),
            Err(_) => break,
        }
    }
    let mut sent = Vec::with_capacity(acks.len());
    for (id, ack) in acks {
        match tokio::time::timeout(Duration::from_secs(2), ack).await {
            Ok(Ok(_)) => sent.push(id),
            _ => break,
        }
    }
    sent
}

/// Sends one row; the returned future is JetStream's acknowledgement.
async fn publish(nats: &Nats, row: &OutboxRow) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
    let subject = format!("{}.events.{}", nats.prefix, row.merchant_id);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("outbox-{}", row.id).as_str());
    headers.insert("Payrail-Event-Type", row.event_type.as_str());
    // The event exactly as merchants read and receive it (docs/API.md, "Events").
    let payload = crate::domain::webhook::event_bytes(row.id, &row.event_type, row.created_at, &row.payload)
        .map_err(|e| e.to_string())?;
    nats.jetstream
        .publish_with_headers(subject, headers, payload.into())
        .await
        .map_err(|e| e.to_string())
}
