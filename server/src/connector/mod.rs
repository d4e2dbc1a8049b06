//! Connectors: tables fed by a generator (`CREATE TABLE ... WITH (connector = ...)`).
//!
//! Each connector-fed table has one ingest task. It asks its [`Generator`] for the rows at
//! offsets `[offset, offset + n)`, paced by `rows_per_second`, and commits them like an
//! INSERT (so views see them in the next epoch) together with the new offset, in one
//! RocksDB write: after a crash the table and the offset agree, and generation resumes at the
//! offset with no gap and no duplicate. A failing commit marks the source unhealthy, is
//! logged, and is retried with exponential backoff. `millrace_sources` shows every source.

pub mod datagen;
pub mod decode;
pub mod file;
pub mod format;
pub mod ingest;
pub mod kafka;
pub mod location;
pub mod nexmark;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use tokio::sync::watch;
use tracing::info;

use crate::catalog::options::ConnectorOptions;
use crate::connector::ingest::{Generator, Pacer, SourceTask};
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::registry::sources::SourceStats;

/// Checks the options against a table of `schema` before anything is stored.
pub fn validate(options: &ConnectorOptions, schema: &SchemaRef) -> Result<()> {
    match options.connector() {
        "file" => {
            file::FileOptions::try_new(options, schema)?;
        }
        "kafka" => {
            kafka::options::KafkaOptions::try_new(options, schema)?;
        }
        _ => {
            generator(options, schema)?;
        }
    }
    options.rate()?;
    options.total()?;
    Ok(())
}

/// A generator for a table of `schema` (validates the options and columns).
pub fn generator(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Box<dyn Generator>> {
    match options.connector() {
        "datagen" => Ok(Box::new(datagen::Datagen::try_new(
            schema.clone(),
            options,
        )?)),
        "nexmark" => Ok(Box::new(nexmark::Nexmark::try_new(
            schema.clone(),
            options,
        )?)),
        other => Err(ServerError::NotSupported(format!("connector '{other}'"))),
    }
}

/// Starts feeding `table` from its committed offset.
pub fn start(
    engine: Arc<Engine>,
    table: Arc<MillraceTable>,
    name: String,
    options: &ConnectorOptions,
) -> Result<()> {
    let sources = engine.sources.clone();
    let id = table.id;
    let reader = match options.connector() {
        "file" => Reader::Files(file::FileOptions::try_new(options, &table.def.schema)?),
        "kafka" => Reader::Kafka(kafka::options::KafkaOptions::try_new(
            options,
            &table.def.schema,
        )?),
        _ => Reader::Generator(generator(options, &table.def.schema)?),
    };
    let offset = match reader {
        // NOTE: file and Kafka sources keep their position as state, read once they run.
        Reader::Files(_) | Reader::Kafka(_) => 0,
        Reader::Generator(_) => engine.store().source_offset(id)?,
    };
    let stats = Arc::new(SourceStats::new(
        name.clone(),
        options.connector().to_string(),
        offset,
        options.rate()?,
    ));
    let (stop, stopped) = watch::channel(false);
    info!(source = %name, connector = %stats.connector, offset, "source started");
    let workers = engine.workers;
    let task = SourceTask {
        engine,
        table,
        name,
        stats: stats.clone(),
        stopped,
    };
    match reader {
        Reader::Files(options) => {
            let reader = file::FileSource { task, options };
            tokio::spawn(reader.run());
        }
        Reader::Kafka(options) => {
            let readers = options.readers.unwrap_or(workers);
            let reader = kafka::KafkaSource {
                task,
                options,
                tokio: tokio::runtime::Handle::current(),
                readers,
            };
            tokio::task::spawn_blocking(move || reader.run());
        }
        Reader::Generator(generator) => {
            let ingest = Ingest {
                task,
                generator,
                total: options.total()?,
            };
            tokio::spawn(ingest.run());
        }
    }
    let read_only = options.values.contains_key(crate::sql::SOURCE_MARKER);
    sources.register(id, stats, stop, read_only);
    Ok(())
}

/// What feeds a source: files in a directory, a Kafka topic, or a generator of rows by
/// offset.
enum Reader {
    Files(file::FileOptions),
    Kafka(kafka::options::KafkaOptions),
    Generator(Box<dyn Generator>),
}

/// One source's ingest loop.
struct Ingest {
    task: SourceTask,
    generator: Box<dyn Generator>,
    total: Option<u64>,
}

impl Ingest {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut pacer = Pacer::new(self.task.stats.limit.load(Ordering::Relaxed));
        loop {
            if *self.task.stopped.borrow() {
                self.task.stats.set_status("stopped", None);
                return;
            }
            let offset = self.task.stats.offset.lock().map(|o| *o).unwrap_or(0);
            let mut rows = pacer.allowance(self.task.stats.limit.load(Ordering::Relaxed));
            if let Some(total) = self.total {
                if total <= offset {
                    self.task.stats.set_status("finished", None);
                    info!(source = %self.task.name, offset, "source finished");
                    let _ = self.task.stopped.changed().await;
                    self.task.stats.set_status("stopped", None);
                    return;
                }
                rows = rows.min(total - offset);
            }
            if rows == 0 {
                self.sleep(pacer.wait()).await;
                continue;
            }
            match self.commit(offset, rows).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    pacer.consumed(rows);
                    self.task.stats.set_status("running", None);
                    if let Ok(mut o) = self.task.stats.offset.lock() {
                        *o = offset + rows;
                    }
                }
                Err(e) => {
                    let wait = self.task.stats.failed(&self.task.name, &e, &mut backoff);
                    self.sleep(wait).await;
                    pacer.restart();
                }
            }
        }
    }

    /// Sleeps, waking early when stopped; true if the sleep ran its course.
    async fn sleep(&mut self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = self.task.stopped.changed() => false,
        }
    }

    /// Generates and commits the rows at `[offset, offset + rows)` with the new offset.
    async fn commit(&mut self, offset: u64, rows: u64) -> Result<()> {
        let batch = self.generator.batch(offset, rows as usize)?;
        let mut set = WriteSet::new();
        set.put_source_offset(self.task.table.id, offset + rows);
        self.task.commit(batch, set, Vec::new()).await
    }
}
