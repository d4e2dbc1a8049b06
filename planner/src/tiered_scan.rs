//! `TieredScanExec`: the scan of a table or view whose columnar cache is partly on object
//! storage.
//!
//! Hot chunks are projected in memory; each cold chunk's Parquet file is read on a blocking
//! thread with only the projected columns and only the live rows (a row selection), so a scan
//! of a mostly spilled table holds one chunk at a time rather than the whole table. When
//! nothing is cold the providers use DataFusion's memory scan instead.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};
use futures::StreamExt;
use millrace_storage::{SnapshotPart, TieredSnapshot};

/// Rows per scan partition above which a scan is split across partitions.
const ROWS_PER_PARTITION: usize = 65_536;

/// A scan over hot batches and cold files.
#[derive(Debug)]
pub struct TieredScanExec {
    /// Parts per output partition.
    partitions: Vec<Vec<SnapshotPart>>,
    /// Columns read (all when `None`).
    projection: Option<Vec<usize>>,
    /// Plan properties.
    properties: Arc<PlanProperties>,
}

impl TieredScanExec {
    /// A scan of `snapshot` producing the `projection` columns.
    pub fn try_new(
        snapshot: TieredSnapshot,
        projection: Option<Vec<usize>>,
    ) -> datafusion::error::Result<Self> {
        let schema: SchemaRef = match &projection {
            Some(p) => Arc::new(snapshot.schema.project(p)?),
            None => snapshot.schema.clone(),
        };
        let partitions = partition(snapshot.parts, SnapshotPart::num_rows);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            partitions,
            projection,
            properties,
        })
    }

    fn counts(&self) -> (usize, usize) {
        let parts = self.partitions.iter().flatten();
        let cold = parts
            .clone()
            .filter(|p| matches!(p, SnapshotPart::Cold { .. }))
            .count();
        (parts.count() - cold, cold)
    }
}

/// Spreads items (batches or snapshot parts) over partitions so that large scans run in
/// parallel.
pub(crate) fn partition<T: Clone>(items: Vec<T>, rows: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let total: usize = items.iter().map(&rows).sum();
    let n = (total / ROWS_PER_PARTITION).clamp(1, 8);
    let mut out = vec![Vec::new(); n];
    for (i, item) in items.into_iter().enumerate() {
        out[i % n].push(item);
    }
    out
}

/// The scan of a snapshot: DataFusion's memory scan when every chunk is hot, else a
/// [`TieredScanExec`].
pub fn scan(
    snapshot: TieredSnapshot,
    projection: Option<&Vec<usize>>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    if snapshot
        .parts
        .iter()
        .any(|p| matches!(p, SnapshotPart::Cold { .. }))
    {
        return Ok(Arc::new(TieredScanExec::try_new(
            snapshot,
            projection.cloned(),
        )?));
    }
    let batches: Vec<RecordBatch> = snapshot
        .parts
        .into_iter()
        .filter_map(|p| match p {
            SnapshotPart::Hot(b) => Some(b),
            SnapshotPart::Cold { .. } => None,
        })
        .collect();
    Ok(MemorySourceConfig::try_new_exec(
        &partition(batches, RecordBatch::num_rows),
        snapshot.schema,
        projection.cloned(),
    )?)
}

impl DisplayAs for TieredScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let (hot, cold) = self.counts();
        write!(
            f,
            "TieredScanExec: partitions={}, hot_chunks={hot}, cold_chunks={cold}",
            self.partitions.len()
        )
    }
}

impl ExecutionPlan for TieredScanExec {
    fn name(&self) -> &str {
        "TieredScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        let parts = self.partitions.get(partition).cloned().unwrap_or_default();
        let projection = self.projection.clone();
        let schema = self.properties.eq_properties.schema().clone();
        let stream = futures::stream::iter(parts)
            .then(move |part| {
                let projection = projection.clone();
                async move {
                    match part {
                        SnapshotPart::Hot(batch) => Ok(vec![match &projection {
                            Some(p) => batch.project(p)?,
                            None => batch,
                        }]),
                        SnapshotPart::Cold { file, rows } => {
                            tokio::task::spawn_blocking(move || {
                                file.read_batches(projection.as_deref(), rows.as_deref())
                            })
                            .await
                            .map_err(|e| DataFusionError::External(Box::new(e)))?
                            .map_err(|e| DataFusionError::External(Box::new(e)))
                        }
                    }
                }
            })
            .flat_map(|r: datafusion::error::Result<Vec<RecordBatch>>| {
                futures::stream::iter(match r {
                    Ok(batches) => batches.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
