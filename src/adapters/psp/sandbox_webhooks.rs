//! The sandbox's webhook sender: events as Stripe sends them, signed with `[webhooks] secret`,
//! POSTed to payrail's own endpoint, retried like a PSP retries, with optional chaos
//! (duplicates, reordering, delays). Bounded: a queue of `QUEUE` events, each tried at most
//! `ATTEMPTS` times.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use rand::Rng;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::signature::sign_stripe;
use crate::config::ChaosConfig;

const QUEUE: usize = 10_000;
const ATTEMPTS: u32 = 8;
/// The longest a reordered event is held back.
const HOLD: Duration = Duration::from_millis(200);

/// One event to send: its type and `data.object`; an id is given when it is queued.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: String,
    pub event_type: &'static str,
    pub object: Value,
    /// Sent no earlier than this long after it was queued.
    pub after: Duration,
}

/// The sending half, held by the sandbox.
#[derive(Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Outgoing>,
}

impl Notifier {
    /// Starts the sender task on the current runtime; events go to `url`.
    pub fn start(url: String, secret: String, chaos: ChaosConfig) -> Notifier {
        let (queue, mut rx) = mpsc::channel::<Outgoing>(QUEUE);
        let (url, secret): (Arc<str>, Arc<str>) = (url.into(), secret.into());
        actix_rt::spawn(async move {
            let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
            let mut held: Option<Outgoing> = None;
            loop {
                // A held (reordered) event goes out behind the next one, or after HOLD at most:
                // reordering delays events, it never loses one.
                let next = match held {
                    Some(_) => tokio::time::timeout(HOLD, rx.recv()).await.ok(),
                    None => Some(rx.recv().await),
                };
                let mut batch = Vec::with_capacity(2);
                match next {
                    Some(None) => break,
                    None => batch.extend(held.take()),
                    Some(Some(event)) => {
                        let roll = |p: f64| p > 0.0 && rand::thread_rng().gen::<f64>() < p;
                        if held.is_none() && roll(chaos.reorder) {
                            held = Some(event);
                            continue;
                        }
                        batch.push(event);
                        batch.extend(held.take());
                    }
                }
                for e in batch {
                    let twice = chaos.duplicate > 0.0 && rand::thread_rng().gen::<f64>() < chaos.duplicate;
                    let (client, url, secret, delay_ms) = (client.clone(), url.clone(), secret.clone(), chaos.delay_ms);
                    // Each event on its own task, so a delayed one does not hold the others.
                    actix_rt::spawn(async move {
                        let jitter = if delay_ms > 0 {
                            rand::thread_rng().gen_range(0..=delay_ms)
                        } else {
                            0
                        };
                        // Most events go at once: no timer for them (one per payment otherwise).
                        let wait = e.after + Duration::from_millis(jitter);
                        if !wait.is_zero() {
                            actix_rt::time::sleep(wait).await;
                        }
                        for _ in 0..if twice { 2 } else { 1 } {
                            deliver(&client, &url, &secret, &e).await;
                        }
                    });
                }
            }
        });
        Notifier { queue }
    }

    /// Queues an event; a full queue drops it with a warning (a PSP's events are best effort;
    /// payrail's state never depends on one arriving).
    pub fn send(&self, event_type: &'static str, object: Value, after: Duration) {
        let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
        if self
            .queue
            .try_send(Outgoing {
                id,
                event_type,
                object,
                after,
            })
            .is_err()
        {
            tracing::warn!(event_type, "sandbox webhook queue full; event dropped");
        }
    }
}

/// An event's body as Stripe sends it, serialized from the queued object without copying it.
#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    object: &'static str,
    #[serde(rename = "type")]
    event_type: &'static str,
    created: i64,
    livemode: bool,
    data: EventData<'a>,
}

#[derive(Serialize)]
struct EventData<'a> {
    object: &'a Value,
}

async fn deliver(client: &awc::Client, url: &str, secret: &str, e: &Outgoing) {
    let body = EventBody {
        id: &e.id,
        object: "event",
        event_type: e.event_type,
        created: chrono::Utc::now().timestamp(),
        livemode: false,
        data: EventData { object: &e.object },
    };
    // A `Value` always serializes; the body is shared by every try (a `Bytes` clone is a count).
    let body = Bytes::from(serde_json::to_vec(&body).expect("a JSON value serializes"));
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        // Signed afresh each try: the timestamp must be within the receiver's tolerance.
        let signature = sign_stripe(&body, secret, chrono::Utc::now().timestamp());
        let sent = client
            .post(url)
            .insert_header(("Stripe-Signature", signature))
            .insert_header(("Content-Type", "application/json"))
            .send_body(body.clone())
            .await;
        // The answer's body is read to its end, small as it is: a connection whose response
        // was left unread cannot go back to the pool, and every event would open a new one.
        let sent = match sent {
            Ok(mut r) => {
                let _ = r.body().limit(1 << 16).await;
                Ok(r)
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if r.status().is_client_error() => {
                tracing::warn!(event_id = %e.id, status = r.status().as_u16(), "sandbox webhook refused");
                return;
            }
            _ => {
                if attempt == ATTEMPTS {
                    tracing::warn!(event_id = %e.id, "sandbox webhook not delivered; giving up");
                    return;
                }
                actix_rt::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
