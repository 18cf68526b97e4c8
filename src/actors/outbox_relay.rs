//! `OutboxRelay`: publishes committed outbox rows to `{prefix}.events.<merchant>` on the
//! `{prefix}_EVENTS` stream, in the order of the transactions that wrote them and pipelined,
//! `Nats-Msg-Id` = `outbox-<id>`, and moves its cursor past the acknowledged ones. A commit that
//! writes outbox rows wakes it; otherwise it polls. Rounds are at least `GATHER` apart, so a
//! stream of commits is relayed in rounds, not a round per commit. Events that an older, still
//! running transaction holds back are looked at again at the next round. Downstream consumers are
//! at-least-once and idempotent (docs/DESIGN.md). Bounded: `BATCH` rows a round; with NATS or
//! PostgreSQL down it backs off (capped) and catches up afterwards.

use std::time::{Duration, Instant};

use crate::adapters::nats::Nats;
use crate::adapters::postgres::outbox::OutboxRow;
use crate::adapters::postgres::Db;

const BATCH: i64 = 500;
const IDLE: Duration = Duration::from_millis(200);
/// The first wait for a transaction that holds committed events back (a batch in flight ends
/// within milliseconds); doubled while the same wait goes on, up to [`HELD_MAX`].
const HELD_MIN: Duration = Duration::from_millis(1);
const HELD_MAX: Duration = Duration::from_millis(100);
/// Rounds begin at least this far apart, unless the last one published a full batch: under a
/// steady stream of commits each round takes what gathered meanwhile, instead of one round (a
/// PostgreSQL transaction) per commit that wakes the relay. 20 ms rather than 5: at 100
/// payments/s, 5.8 PostgreSQL transactions a payment instead of 7.0 (docs/BENCHMARKS.md,
/// "2026-11-29 (afternoon)"); an event nothing holds back waits at most that long for its round,
/// and one held back is looked at again no sooner.
const GATHER: Duration = Duration::from_millis(20);

/// Events held back this long by one wait are logged, with the oldest transaction that holds
/// them (any database of the PostgreSQL cluster), and again at this interval while it lasts.
const HELD_WARN: Duration = Duration::from_secs(10);

pub fn spawn(db: Db, nats: Nats, shutdown: crate::shutdown::Shutdown) {
    actix_rt::spawn(async move {
        let _running = shutdown.enter();
        let mut backoff = IDLE;
        let mut held = HELD_MIN;
        // Since when events have waited with none published, and when that was last logged.
        let mut held_since: Option<Instant> = None;
        let mut warned: Option<Instant> = None;
        let mut last_round: Option<Instant> = None;
        while !shutdown.is_stopping() {
            if let Some(gap) = last_round.and_then(|at| GATHER.checked_sub(at.elapsed())) {
                if shutdown.sleep(gap).await {
                    break;
                }
            }
            last_round = Some(Instant::now());
            let nats_ref = &nats;
            let round = db
                .relay_outbox(BATCH, |rows| async move { publish_in_order(nats_ref, &rows).await })
                .await;
            match &round {
                Ok(r) if r.held && r.published == 0 && !r.failed => {
                    let since = *held_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= HELD_WARN && warned.is_none_or(|w| w.elapsed() >= HELD_WARN) {
                        warned = Some(Instant::now());
                        let holder = db.oldest_writer().await.unwrap_or_default();
                        tracing::warn!(
                            held_secs = since.elapsed().as_secs(),
                            %holder,
                            "committed events wait for an older transaction still running in the PostgreSQL cluster"
                        );
                    }
                }
                _ => {
                    held = HELD_MIN;
                    held_since = None;
                    warned = None;
                }
            }
            backoff = match round {
                // NATS refused or timed out: as when nothing waits (woken by commits, or polls).
                Ok(r) if r.failed => IDLE,
                Ok(r) if r.published as i64 == BATCH => {
                    // Catching up: the next round at once.
                    last_round = None;
                    Duration::ZERO
                }
                // Events wait behind a transaction still running (a batch in flight, most often,
                // which ends within milliseconds): look again soon, then less and less often.
                // Not woken by commits: under load one lands every few milliseconds, and each
                // round would read the same waiting events again.
                Ok(r) if r.held => {
                    let wait = held;
                    held = (held * 2).min(HELD_MAX);
                    if shutdown.sleep(wait).await {
                        break;
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
