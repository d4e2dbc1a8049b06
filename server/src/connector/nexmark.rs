//! `connector = 'nexmark'`: the Nexmark person / auction / bid streams from the `nexmark`
//! crate (a port of the reference generator), turned straight into Arrow columns.
//!
//! `nexmark.table.type` picks the stream (`Person`, `Auction` or `Bid`); the table declares
//! any subset of that stream's fields by name (`date_time` and `expires` as timestamps or
//! bigint milliseconds). Event `n` of a stream is always the same event (event times start
//! at a fixed base time), so an offset is all a restart needs.

use std::sync::Arc;

use ::nexmark::EventGenerator;
use ::nexmark::config::NexmarkConfig;
use ::nexmark::event::{Event, EventType};
use datafusion::arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};

use crate::catalog::options::ConnectorOptions;
use crate::connector::ingest::Generator;
use crate::error::{Result, ServerError};

/// Event time of the first event (2024-01-01T00:00:00Z) unless `nexmark.base.time` (epoch
/// milliseconds) says otherwise.
const BASE_TIME_MILLIS: u64 = 1_704_067_200_000;

/// A field of a Nexmark event as a column value.
enum Cell {
    Int(i64),
    Text(String),
    Millis(i64),
}

/// The fields of each stream, in the reference schema's order.
const PERSON: &[&str] = &[
    "id",
    "name",
    "email_address",
    "credit_card",
    "city",
    "state",
    "date_time",
    "extra",
];
const AUCTION: &[&str] = &[
    "id",
    "item_name",
    "description",
    "initial_bid",
    "reserve",
    "date_time",
    "expires",
    "seller",
    "category",
    "extra",
];
const BID: &[&str] = &[
    "auction",
    "bidder",
    "price",
    "channel",
    "url",
    "date_time",
    "extra",
];

/// The Nexmark generator of one table.
pub struct Nexmark {
    schema: SchemaRef,
    /// Generator settings; the base time is fixed so that event `n` never changes.
    config: NexmarkConfig,
    stream: EventType,
    /// Field index in the stream for each table column.
    fields: Vec<usize>,
}

impl Nexmark {
    /// A generator for `schema`; every column must be a field of the chosen stream.
    pub fn try_new(schema: SchemaRef, options: &ConnectorOptions) -> Result<Self> {
        let kind = options
            .values
            .get("nexmark.table.type")
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_else(|| "bid".into());
        let (stream, names) = match kind.as_str() {
            "person" => (EventType::Person, PERSON),
            "auction" => (EventType::Auction, AUCTION),
            "bid" => (EventType::Bid, BID),
            other => {
                return Err(ServerError::InvalidSetting {
                    name: "nexmark.table.type".into(),
                    value: other.into(),
                });
            }
        };
        let fields = schema
            .fields()
            .iter()
            .map(|f| {
                names
                    .iter()
                    .position(|n| *n == f.name().to_ascii_lowercase())
                    .ok_or_else(|| {
                        ServerError::NotSupported(format!(
                            "column \"{}\" in a nexmark {kind} table (fields: {})",
                            f.name(),
                            names.join(", ")
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let base_time = options
            .number("nexmark.base.time")?
            .unwrap_or(BASE_TIME_MILLIS);
        let config = NexmarkConfig {
            base_time,
            ..NexmarkConfig::default()
        };
        Ok(Self {
            schema,
            config,
            stream,
            fields,
        })
    }
}

fn cells(event: Event) -> Vec<Cell> {
    let int = |v: usize| Cell::Int(v as i64);
    match event {
        Event::Person(p) => vec![
            int(p.id),
            Cell::Text(p.name),
            Cell::Text(p.email_address),
            Cell::Text(p.credit_card),
            Cell::Text(p.city),
            Cell::Text(p.state),
            Cell::Millis(p.date_time as i64),
            Cell::Text(p.extra),
        ],
        Event::Auction(a) => vec![
            int(a.id),
            Cell::Text(a.item_name),
            Cell::Text(a.description),
            int(a.initial_bid),
            int(a.reserve),
            Cell::Millis(a.date_time as i64),
            Cell::Millis(a.expires as i64),
            int(a.seller),
            int(a.category),
            Cell::Text(a.extra),
        ],
        Event::Bid(b) => vec![
            int(b.auction),
            int(b.bidder),
            int(b.price),
            Cell::Text(b.channel),
            Cell::Text(b.url),
            Cell::Millis(b.date_time as i64),
            Cell::Text(b.extra),
        ],
    }
}

impl Generator for Nexmark {
    fn batch(&mut self, from: u64, rows: usize) -> Result<RecordBatch> {
        let events: Vec<Vec<Cell>> = EventGenerator::new(self.config.clone())
            .with_type_filter(self.stream)
            .with_offset(from)
            .take(rows)
            .map(cells)
            .collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.fields.len());
        for (field, &index) in self.schema.fields().iter().zip(&self.fields) {
            let column: ArrayRef = match events.first().map(|e| &e[index]) {
                Some(Cell::Text(_)) => Arc::new(StringArray::from_iter_values(events.iter().map(
                    |e| match &e[index] {
                        Cell::Text(s) => s.as_str(),
                        _ => "",
                    },
                ))),
                Some(Cell::Millis(_)) if matches!(field.data_type(), DataType::Timestamp(..)) => {
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        events.iter().map(|e| match e[index] {
                            Cell::Millis(v) | Cell::Int(v) => v,
                            Cell::Text(_) => 0,
                        }),
                    ))
                }
                _ => Arc::new(Int64Array::from_iter_values(events.iter().map(
                    |e| match e[index] {
                        Cell::Millis(v) | Cell::Int(v) => v,
                        Cell::Text(_) => 0,
                    },
                ))),
            };
            let target = field.data_type();
            let column = match (column.data_type(), target) {
                (DataType::Timestamp(TimeUnit::Millisecond, None), DataType::Timestamp(_, _)) => {
                    cast(&column, target)?
                }
                (a, b) if a == b => column,
                _ => cast(&column, target)?,
            };
            columns.push(column);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}
