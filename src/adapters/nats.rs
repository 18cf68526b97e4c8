//! NATS JetStream: the connection, and the streams of docs/DESIGN.md's layout.
//!
//! `{prefix}_PSP_EVENTS` carries verified PSP events on `{prefix}.psp.events.<partition>.<provider>`;
//! `{prefix}_EVENTS` carries outbox events on `{prefix}.events.<merchant>`.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::NatsConfig;

/// Tries of the stream setup at start, 500 ms apart, after the first.
const STREAM_SETUP_TRIES: u32 = 20;

#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    /// What JetStream holds was made with settings this node cannot work with: trying again
    /// changes nothing.
    #[error("JetStream: {0}")]
    Settings(String),
}

impl Nats {
    pub async fn connect(config: &NatsConfig) -> Result<Nats, NatsError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .name("payrail")
            // A comma-separated list reaches a cluster: the client picks one and fails over.
            .connect(config.url.split(',').map(str::trim).collect::<Vec<&str>>())
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        let jetstream = jetstream::new(client.clone());
        let nats = Nats {
            client,
            jetstream,
            prefix: config.stream_prefix.clone(),
        };
        // A JetStream cluster that has just formed (or lost a server) may time out a stream
        // request while it settles: a bounded number of tries, then the error.
        let mut tries = 0;
        loop {
            match nats.ensure_streams(config).await {
                Ok(()) => return Ok(nats),
                Err(e) if tries < STREAM_SETUP_TRIES => {
                    tries += 1;
                    tracing::warn!(error = %e, tries, "JetStream streams not ready; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn psp_events_stream(&self) -> String {
        format!("{}_PSP_EVENTS", self.prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.prefix)
    }

    async fn ensure_streams(&self, config: &NatsConfig) -> Result<(), NatsError> {
        let window = Duration::from_secs(config.duplicate_window_secs);
        // PSP events: a work queue. An event leaves the stream when its partition's consumer
        // acknowledges it (applied, or parked as a dead letter), never because newer ones came
        // or time passed: a full stream refuses the next publish, and the bridge answers 503 so
        // that the PSP retries. (With the default limits retention, a stalled partition's oldest
        // events were dropped, unapplied, once `max_stream_messages` newer ones had arrived.)
        let psp = stream::Config {
            name: self.psp_events_stream(),
            subjects: vec![format!("{}.psp.events.>", self.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            duplicate_window: window,
            max_messages: config.max_stream_messages,
            num_replicas: config.replicas,
            ..Default::default()
        };
        // Outbox events: a history, read by merchant-webhook delivery at its own pace.
        let events = stream::Config {
            name: self.events_stream(),
            subjects: vec![format!("{}.events.>", self.prefix)],
            storage: stream::StorageType::File,
            duplicate_window: window,
            max_messages: config.max_stream_messages,
            max_age: Duration::from_secs(7 * 24 * 3600),
            num_replicas: config.replicas,
            ..Default::default()
        };
        for wanted in [psp, events] {
            let stream = self
                .jetstream
                .get_or_create_stream(wanted.clone())
                .await
                .map_err(|e| NatsError::JetStream(e.to_string()))?;
            // An existing stream keeps its settings (JetStream cannot change a stream's
            // retention): say so, rather than run with weaker guarantees unnoticed.
            // The created (or found) stream's settings, as the server answered the call.
            let info = stream.cached_info();
            if info.config.retention != wanted.retention || info.config.discard != wanted.discard {
                tracing::warn!(stream = %wanted.name, retention = ?info.config.retention, discard = ?info.config.discard,
                    "the stream was made with other settings than this version makes; recreate it when it is drained (docs/DESIGN.md, \"NATS JetStream layout\")");
            }
        }
        Ok(())
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// A verified PSP event as payrail carries it through JetStream (MessagePack).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PspEvent {
    /// `sandbox`, `stripe` or `adyen`: also the `psp` of the payments it concerns.
    pub provider: String,
    /// The PSP's event id: JetStream's `Nats-Msg-Id` and the dedupe key.
    pub event_id: String,
    pub event_type: String,
    /// The PSP object reference (`pi_…`) that finds the payment; empty when the event has none.
    pub reference: String,
    /// `data.object` of the event, as JSON bytes.
    pub object: Vec<u8>,
    /// The PSP's body exactly as it came, for audit.
    pub raw: Vec<u8>,
    /// The merchant whose connector's own secret verified it (its webhook URL); `None` when
    /// the deployment's secret for the PSP did. Such an event may only change that merchant's
    /// payments.
    #[serde(default)]
    pub merchant: Option<String>,
    /// Not carried: the event consumer found no `processed_events` row for this event when it
    /// looked its payment up, just before handing it to the payment's actor, which then saves
    /// its own look-up. Only a saving: an event's deliveries are handled one at a time on one
    /// node (one reference, one partition), but a partition changing hands, or a commit of the
    /// event that failed and may have landed, can record it in between; the `processed_events`
    /// primary key is what refuses a second record. `false` (the actor looks) whenever it was
    /// not so found: a call forwarded from another node, a reloaded actor's second run, a test.
    #[serde(skip)]
    pub unrecorded: bool,
}

/// The partition of a PSP object reference: one payment's events always share one.
pub fn partition(reference: &str, partitions: u32) -> u32 {
    (crate::domain::ids::stable_hash(reference) % u64::from(partitions.max(1))) as u32
}

impl Nats {
    pub fn psp_subject(&self, partition: u32, provider: &str) -> String {
        format!("{}.psp.events.{partition}.{provider}", self.prefix)
    }

    /// Publishes `event` with `Nats-Msg-Id` = its event id and waits for JetStream's ack;
    /// returns whether JetStream saw it as a duplicate. Bounded by `timeout`.
    pub async fn publish_psp_event(
        &self,
        event: &PspEvent,
        partitions: u32,
        timeout: Duration,
    ) -> Result<bool, NatsError> {
        self.publish_psp_event_as(event, &event.event_id, partitions, timeout)
            .await
    }

    /// Like [`Nats::publish_psp_event`] under another `Nats-Msg-Id`: a dead letter replayed
    /// within the duplicate window must not be taken for the original.
    pub async fn publish_psp_event_as(
        &self,
        event: &PspEvent,
        message_id: &str,
        partitions: u32,
        timeout: Duration,
    ) -> Result<bool, NatsError> {
        // A header value with a control character would make the client panic: refuse it.
        if message_id.is_empty() || !message_id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(NatsError::JetStream("the message id is not printable ASCII".into()));
        }
        let payload = rmp_serde::to_vec_named(event).map_err(|e| NatsError::JetStream(e.to_string()))?;
        let subject = self.psp_subject(partition(&event.reference, partitions), &event.provider);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id);
        let publish = async {
            let ack = self
                .jetstream
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| NatsError::JetStream(e.to_string()))?;
            ack.await.map_err(|e| NatsError::JetStream(e.to_string()))
        };
        let ack = tokio::time::timeout(timeout, publish)
            .await
            .map_err(|_| NatsError::JetStream("publish timed out".into()))??;
        Ok(ack.duplicate)
    }

    /// The durable pull consumer of one partition: explicit acks. `max_deliver` is -1 in
    /// production: JetStream never gives up on an event; payrail parks it as a dead letter
    /// itself once it has failed often enough, and only after the dead letter is stored.
    pub async fn psp_consumer(
        &self,
        partition: u32,
        ack_wait: Duration,
        max_deliver: i64,
    ) -> Result<jetstream::consumer::PullConsumer, NatsError> {
        let stream = self
            .jetstream
            .get_stream(self.psp_events_stream())
            .await
            .map_err(|e| NatsError::JetStream(e.to_string()))?;
        let name = format!("{}_psp_{partition}", self.prefix);
        stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.psp.events.{partition}.>", self.prefix),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_deliver,
                    max_ack_pending: 1_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::JetStream(e.to_string()))
    }
}

impl Nats {
    /// The durable pull consumer that feeds merchant webhook delivery: every outbox event,
    /// explicit acks, never given up on (an event is acknowledged once its deliveries are
    /// stored in PostgreSQL).
    pub async fn webhooks_consumer(&self, ack_wait: Duration) -> Result<jetstream::consumer::PullConsumer, NatsError> {
        let stream = self
            .jetstream
            .get_stream(self.events_stream())
            .await
            .map_err(|e| NatsError::JetStream(e.to_string()))?;
        let name = format!("{}_webhooks_out", self.prefix);
        stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.events.>", self.prefix),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                    // When first made (at the first start with merchant webhooks): from then
                    // on. Older events stay readable and redeliverable through the API.
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::JetStream(e.to_string()))
    }
}

/// One pull from `consumer`: what is there now, up to `max` messages, waiting at most a second
/// for the first (a broken connection or consumer is an error; the caller backs off).
pub async fn fetch_batch(
    consumer: &jetstream::consumer::PullConsumer,
    max: usize,
) -> Result<Vec<jetstream::Message>, NatsError> {
    use futures_util::StreamExt;
    let mut batch = consumer
        .fetch()
        .max_messages(max.max(1))
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| NatsError::JetStream(e.to_string()))?;
    let mut messages = Vec::with_capacity(max);
    loop {
        match batch.next().await {
            Some(Ok(m)) => messages.push(m),
            // The pull failed (the consumer or its stream is gone: no responders, say). With
            // nothing in hand that is the caller's to handle (back off, make the consumer
            // again); an empty batch would have it pull again at once, forever.
            Some(Err(e)) if messages.is_empty() => return Err(NatsError::JetStream(e.to_string())),
            // The pull expired, or failed after some messages: what came is handed on.
            Some(Err(_)) | None => break,
        }
    }
    Ok(messages)
}

/// What operators watch on one partition's consumer.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsumerLag {
    /// Events in the stream not yet delivered to the consumer.
    pub pending: u64,
    /// Delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Events delivered more than once (unacknowledged in time, or NAKed).
    pub redelivered: u64,
}

impl Nats {
    /// The consumers' lag summed over partitions; `None` when JetStream does not answer in time.
    pub async fn psp_consumer_lag(&self, partitions: u32) -> Option<ConsumerLag> {
        let ask = async {
            let stream = self.jetstream.get_stream(self.psp_events_stream()).await.ok()?;
            let mut lag = ConsumerLag::default();
            for p in 0..partitions {
                let info = stream.consumer_info(format!("{}_psp_{p}", self.prefix)).await.ok()?;
                lag.pending += info.num_pending;
                lag.ack_pending += info.num_ack_pending as u64;
                lag.redelivered += info.num_redelivered as u64;
            }
            Some(lag)
        };
        tokio::time::timeout(Duration::from_millis(500), ask)
            .await
            .ok()
            .flatten()
    }
}
