//! NATS JetStream: the connection, and the streams of DESIGN.md's layout.
//!
//! `{prefix}_PSP_EVENTS` carries verified PSP events on `{prefix}.psp.events.<partition>.<provider>`;
//! `{prefix}_EVENTS` carries outbox events on `{prefix}.events.<merchant>`.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::NatsConfig;

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
}

impl Nats {
    pub async fn connect(config: &NatsConfig) -> Result<Nats, NatsError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .name("payrail")
            .connect(config.url.as_str())
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        let jetstream = jetstream::new(client.clone());
        let nats = Nats {
            client,
            jetstream,
            prefix: config.stream_prefix.clone(),
        };
        nats.ensure_streams(config).await?;
        Ok(nats)
    }

    pub fn psp_events_stream(&self) -> String {
        format!("{}_PSP_EVENTS", self.prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.prefix)
    }

    async fn ensure_streams(&self, config: &NatsConfig) -> Result<(), NatsError> {
        let window = Duration::from_secs(config.duplicate_window_secs);
        for (name, subject) in [
            (self.psp_events_stream(), format!("{}.psp.events.>", self.prefix)),
            (self.events_stream(), format!("{}.events.>", self.prefix)),
        ] {
            self.jetstream
                .get_or_create_stream(stream::Config {
                    name,
                    subjects: vec![subject],
                    storage: stream::StorageType::File,
                    duplicate_window: window,
                    max_messages: config.max_stream_messages,
                    max_age: Duration::from_secs(7 * 24 * 3600),
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::JetStream(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
