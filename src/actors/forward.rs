//! Cluster mode: a call for a payment whose partition another node owns is forwarded to that
//! node over NATS request/reply, on `{prefix}.cluster.node.<node>`, as MessagePack both ways.
//! The owner runs it through its own registry and actor, exactly as a call that reached it
//! directly, and answers with the reply or with the error already rendered in the API's words.
//!
//! Why NATS and not HTTP to the owner: every node already holds a NATS connection (no second
//! connection pool, no peer addresses to keep), requests carry no HTTP parsing or auth twice,
//! and "no responders" tells at once that the owner is gone. The caller waits at most
//! `[cluster] forward_timeout_ms`; a call that gets no answer is a 503 whose outcome is unknown:
//! the idempotency key stays in flight until its lease passes (the call may still complete at
//! the owner), and a retry meanwhile is 409, then the stored answer.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::error::PaymentError;
use super::payment::{IdemKey, Op, PaymentCall, Reply};
use super::registry::PaymentRegistry;
use crate::adapters::cluster::Leases;
use crate::adapters::nats::NatsError;
use crate::domain::{MerchantId, PaymentId};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Cluster mode: the partition's owner cannot be reached *because the partition is changing
/// hands* (no live owner yet, the owner gone or just given it up, this node's own lease lost
/// under a call). Retrying shortly is right, and it is not a failure of the call itself.
pub const NO_OWNER: &str = "payment's partition (no live owner yet)";
pub const MOVING: &str = "payment's partition (moving between nodes)";
pub const OWNER_GONE: &str = "payment's node (gone; its partition moves in seconds)";
pub const MOVED: &str = "payment (its partition moved to another node)";

/// Whether `e` only says that the payment's partition is changing hands.
pub fn is_handover(e: &PaymentError) -> bool {
    matches!(e, PaymentError::Unavailable(w) if [NO_OWNER, MOVING, OWNER_GONE, MOVED].contains(w))
}

/// A call as it travels.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    payment: PaymentId,
    merchant: MerchantId,
    op: Op,
    idem: Option<IdemKey>,
}

/// The owner's answer.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Reply {
        status: u16,
        body: Vec<u8>,
        stored: bool,
    },
    Error {
        status: u16,
        body: Vec<u8>,
        replayable: bool,
    },
    /// The partition is not (or no longer) the answering node's: the caller's view was behind.
    NotOwner,
}

pub struct Forwarder {
    pub client: async_nats::Client,
    pub prefix: String,
    pub leases: Arc<Leases>,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl Forwarder {
    fn subject(&self, node: &str) -> String {
        format!("{}.cluster.node.{node}", self.prefix)
    }

    /// Sends `call` to the owner of `partition` and waits for its answer.
    pub async fn call(&self, partition: u32, id: &PaymentId, call: PaymentCall) -> Result<Reply, PaymentError> {
        let owner = match self.leases.owner(partition) {
            Some(owner) if *owner != *self.leases.node => owner,
            _ => {
                self.metrics.forwarded("unavailable");
                return Err(PaymentError::Unavailable(NO_OWNER));
            }
        };
        let request = Request {
            payment: id.clone(),
            merchant: call.merchant,
            op: call.op,
            idem: call.idem,
        };
        let payload = rmp_serde::to_vec_named(&request).map_err(|_| PaymentError::Unavailable("forwarding"))?;
        let sent = self
            .client
            .send_request(
                self.subject(&owner),
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.timeout)),
            )
            .await;
        let message = match sent {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                self.metrics.forwarded("unavailable");
                return Err(PaymentError::Unavailable(OWNER_GONE));
            }
            Err(e) => {
                // It may still be at work on it: its outcome is unknown, so the idempotency key
                // stays claimed until its lease passes (a retry meanwhile gets 409, never a
                // second run racing the first).
                tracing::warn!(payment_id = %id, node = %owner, error = %e, "forwarded call got no answer in time");
                self.metrics.forwarded("unavailable");
                return Err(PaymentError::OutcomeUnknown);
            }
        };
        match rmp_serde::from_slice::<Answer>(&message.payload) {
            Ok(Answer::Reply { status, body, stored }) => {
                self.metrics.forwarded("ok");
                Ok(Reply { status, body, stored })
            }
            Ok(Answer::Error {
                status,
                body,
                replayable,
            }) => {
                self.metrics.forwarded("refused");
                Err(PaymentError::Remote {
                    status,
                    body,
                    replayable,
                })
            }
            Ok(Answer::NotOwner) | Err(_) => {
                self.metrics.forwarded("unavailable");
                Err(PaymentError::Unavailable(MOVING))
            }
        }
    }

    /// Serves calls other nodes forward to this one until shutdown; at most
    /// `max_in_flight` at once (past that, the caller gets 503).
    pub async fn serve(
        self: Arc<Self>,
        registry: Arc<PaymentRegistry>,
        max_in_flight: usize,
        threads: usize,
        shutdown: Shutdown,
    ) -> Result<(), NatsError> {
        let mut requests = self
            .client
            .subscribe(self.subject(&self.leases.node))
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        let permits = Arc::new(Semaphore::new(max_in_flight));
        // Forwarded calls run on threads of their own, as HTTP requests run on the workers': the
        // actors they start live there, not all on the thread that reads the subscription.
        let arbiters: Vec<actix_rt::Arbiter> = (0..threads.max(1)).map(|_| actix_rt::Arbiter::new()).collect();
        actix_rt::spawn(async move {
            let mut next = 0usize;
            let _running = shutdown.enter();
            loop {
                // `sleep` also wakes when another loop ends a round: only a real stop ends this one.
                let message = tokio::select! {
                    m = requests.next() => m,
                    stopping = shutdown.sleep(Duration::from_secs(3600)) => match stopping {
                        true => None,
                        false => continue,
                    },
                };
                let Some(message) = message else { break };
                let Some(reply_to) = message.reply.clone() else {
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    let busy = crate::api::error::ApiError::Unavailable("payment's node (too many forwarded calls)");
                    let answer = Answer::Error {
                        status: 503,
                        body: busy.body(),
                        replayable: false,
                    };
                    let _ = self.client.publish(reply_to, encode(&answer).into()).await;
                    continue;
                };
                let (this, registry) = (self.clone(), registry.clone());
                next = next.wrapping_add(1);
                arbiters[next % arbiters.len()].spawn(async move {
                    let answer = this.answer(&registry, &message.payload).await;
                    let _ = this.client.publish(reply_to, encode(&answer).into()).await;
                    drop(permit);
                });
            }
            let _ = requests.unsubscribe().await;
        });
        Ok(())
    }

    async fn answer(&self, registry: &PaymentRegistry, payload: &[u8]) -> Answer {
        let Ok(request) = rmp_serde::from_slice::<Request>(payload) else {
            // A call this node cannot read (a node of another version sent it): not the client's
            // fault, and nothing was done; the client may send it again (to a node that can).
            let refused = crate::api::error::ApiError::Unavailable("forwarding");
            return Answer::Error {
                status: refused.status().as_u16(),
                body: refused.body(),
                replayable: false,
            };
        };
        if !self.leases.owns(self.leases.partition_of(request.payment.as_str())) {
            return Answer::NotOwner;
        }
        let span = tracing::info_span!("forwarded", payment_id = %request.payment);
        let call = PaymentCall {
            merchant: request.merchant,
            op: request.op,
            idem: request.idem,
            parent: span,
        };
        match registry.call_local(&request.payment, None, call).await {
            Ok(r) => Answer::Reply {
                status: r.status,
                body: r.body,
                stored: r.stored,
            },
            Err(e) => {
                let e = crate::api::error::ApiError::from(e);
                Answer::Error {
                    status: e.status().as_u16(),
                    body: e.body(),
                    replayable: e.is_replayable(),
                }
            }
        }
    }
}

fn encode(answer: &Answer) -> Vec<u8> {
    rmp_serde::to_vec_named(answer).unwrap_or_default()
}
