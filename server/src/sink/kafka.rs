//! `CREATE SINK ... WITH (connector = 'kafka', brokers = '...', topic = '...')`: each line of
//! a change is one message. The message key is the row's JSON, so every change to one row
//! goes to one partition in order; the value carries the change's `seq` and the line's
//! `index` within it.
//!
//! Exactly-once here is by deduplication, not by broker transactions (the test broker,
//! tansu, does not offer them): a change delivered again after a crash or a failed send is
//! re-sent with the same `seq` and `index`, so a consumer keeps the first message of each
//! (`seq`, `index`) and drops the rest. The producer waits for every message's
//! acknowledgement (`acks = all`) before the change counts as delivered.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::catalog::options::ConnectorOptions;
use crate::error::{Result, ServerError};

/// A topic receiving a sink's changes.
pub struct KafkaTarget {
    topic: String,
    config: ClientConfig,
    producer: Option<FutureProducer>,
}

impl KafkaTarget {
    /// The target named by `brokers` and `topic` (`properties.*` go to librdkafka).
    pub fn try_new(options: &ConnectorOptions) -> Result<Self> {
        let brokers = options.required(&["brokers", "properties.bootstrap.server"])?;
        let topic = options.required(&["topic"])?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            // NOTE: one request in flight keeps a partition's messages in order across
            // retries (a row's insert never overtakes its delete).
            .set("max.in.flight.requests.per.connection", "1")
            .set("message.timeout.ms", "5000")
            .set("log_level", "3");
        for (k, v) in &options.values {
            if let Some(name) = k.strip_prefix("properties.")
                && name != "bootstrap.server"
            {
                config.set(name, v);
            }
        }
        Ok(Self {
            topic,
            config,
            producer: None,
        })
    }

    /// Sends every line of change `seq` and waits for all acknowledgements.
    pub async fn deliver(&mut self, _seq: u64, payload: &str) -> Result<()> {
        if self.producer.is_none() {
            self.producer = Some(
                self.config
                    .create()
                    .map_err(|e| ServerError::Connector(format!("kafka sink: {e}")))?,
            );
        }
        let Some(producer) = &self.producer else {
            return Err(ServerError::Internal("kafka sink has no producer".into()));
        };
        let mut pending = Vec::new();
        for line in payload.lines() {
            let key = row_of(line);
            let record = FutureRecord::to(&self.topic).key(key).payload(line);
            pending.push(producer.send(record, Duration::from_secs(5)));
        }
        let mut failure = None;
        for sent in futures::future::join_all(pending).await {
            if let Err((e, _)) = sent {
                failure = Some(e);
            }
        }
        match failure {
            None => Ok(()),
            Some(e) => {
                // NOTE: a fresh producer after a failure drops whatever librdkafka still queues.
                self.producer = None;
                Err(ServerError::Connector(format!(
                    "kafka sink topic {}: {e}",
                    self.topic
                )))
            }
        }
    }
}

/// The `"row":{...}` part of a line (the message key).
fn row_of(line: &str) -> &str {
    line.find("\"row\":")
        .map(|i| &line[i + 6..line.len().saturating_sub(1)])
        .unwrap_or(line)
}
