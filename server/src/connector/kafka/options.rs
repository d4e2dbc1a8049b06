//! The Kafka connector's settings, checked at CREATE: brokers, topic, where a partition
//! starts, the decoder of its records, where each column comes from, and the settings passed
//! to librdkafka.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::{FieldRef, SchemaRef};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

use crate::catalog::options::ConnectorOptions;
use crate::connector::decode::RecordDecoder;
use crate::connector::kafka::fetch::FetchSpec;
use crate::error::{Result, ServerError};

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Startup {
    Earliest,
    Latest,
    /// The first message at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// Where a table column's value comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Column {
    /// The n-th decoded payload field.
    Payload(usize),
    Key,
    Partition,
    Offset,
    Timestamp,
}

/// The Kafka connector's settings, checked at CREATE.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    pub(crate) brokers: String,
    pub(crate) topic: String,
    pub(crate) startup: Startup,
    pub(crate) decoder: RecordDecoder,
    pub(crate) columns: Vec<Column>,
    pub(crate) schema: SchemaRef,
    /// `properties.<name>` options, passed to librdkafka as `<name>`.
    pub(crate) properties: Vec<(String, String)>,
    /// `readers = n`: how many consumers the partitions are split over (default: one per
    /// pipeline worker).
    pub(crate) readers: Option<usize>,
}

impl KafkaOptions {
    /// The settings of a Kafka source feeding a table of `schema`.
    pub fn try_new(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Self> {
        let brokers = options.required(&["brokers", "properties.bootstrap.server"])?;
        let topic = options.required(&["topic"])?;
        let startup = match options
            .values
            .get("scan.startup.mode")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("earliest") => Startup::Earliest,
            Some("latest") => Startup::Latest,
            Some("timestamp") => Startup::Timestamp(
                options
                    .number("scan.startup.timestamp.millis")?
                    .ok_or_else(|| ServerError::InvalidSetting {
                        name: "scan.startup.timestamp.millis".into(),
                        value: String::new(),
                    })? as i64,
            ),
            Some(other) => {
                return Err(ServerError::InvalidSetting {
                    name: "scan.startup.mode".into(),
                    value: other.into(),
                });
            }
        };
        let mut payload: Vec<FieldRef> = Vec::new();
        let columns = schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "_key" => Column::Key,
                "_partition" => Column::Partition,
                "_offset" => Column::Offset,
                "_timestamp" => Column::Timestamp,
                _ => {
                    payload.push(f.clone());
                    Column::Payload(payload.len() - 1)
                }
            })
            .collect();
        let properties = options
            .values
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("properties.")?;
                (name != "bootstrap.server").then(|| (name.to_string(), v.clone()))
            })
            .collect();
        let readers = match options.number("readers")? {
            Some(0) => {
                return Err(ServerError::InvalidSetting {
                    name: "readers".into(),
                    value: "0".into(),
                });
            }
            n => n.map(|n| n as usize),
        };
        let decoder = RecordDecoder::try_new(options, payload)?;
        match decoder.format() {
            crate::connector::format::Format::Parquet => {
                return Err(ServerError::NotSupported(
                    "format parquet for Kafka messages".into(),
                ));
            }
            crate::connector::format::Format::Avro if !decoder.has_avro_schema() => {
                return Err(ServerError::InvalidSetting {
                    name: "avro.schema".into(),
                    value: "FORMAT AVRO messages need a schema: avro.schema or schema.location"
                        .into(),
                });
            }
            _ => {}
        }
        Ok(Self {
            brokers,
            topic,
            startup,
            decoder,
            columns,
            schema: schema.clone(),
            properties,
            readers,
        })
    }

    /// The librdkafka settings of the source's consumers: the broker, a group of its own
    /// (offsets are kept by Millrace, never committed to the group), then the user's
    /// `properties.*`, which may override any of them.
    pub(crate) fn client_settings(&self, table_id: u64) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("socket.timeout.ms", "5000"),
            ("queued.max.messages.kbytes", "16384"),
            // NOTE: an offset the broker no longer has (a topic deleted and created again,
            // or truncated) is an error that ends the session, whose start then decides
            // where to read on and logs it; librdkafka's default would jump silently.
            ("auto.offset.reset", "error"),
            ("log_level", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        settings.push(("group.id".into(), format!("millrace-{table_id}")));
        settings.extend(self.properties.iter().cloned());
        settings
    }

    /// A consumer in this process, for metadata and watermarks only: it is assigned no
    /// partitions, so it never fetches (the readers' fetch processes do).
    pub(crate) fn consumer(&self, table_id: u64) -> Result<BaseConsumer> {
        let mut config = ClientConfig::new();
        for (k, v) in self.client_settings(table_id) {
            config.set(k, v);
        }
        config.create().map_err(kafka_error)
    }

    /// What a reader's fetch process reads: `assignment` (partition, next offset).
    pub(crate) fn fetch_spec(&self, table_id: u64, assignment: &Offsets) -> FetchSpec {
        FetchSpec {
            config: self.client_settings(table_id),
            topic: self.topic.clone(),
            assignment: assignment.iter().map(|(p, o)| (*p, *o)).collect(),
        }
    }
}

/// Next offset to read, by partition.
pub(crate) type Offsets = BTreeMap<i32, i64>;

/// A librdkafka error as the source reports it.
pub(crate) fn kafka_error(e: KafkaError) -> ServerError {
    ServerError::Connector(format!("kafka: {e}"))
}
