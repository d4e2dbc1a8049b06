//! Changelog batches: the unit on every edge of an incremental pipeline.
//!
//! A changelog is an Arrow [`RecordBatch`] plus a signed weight per row: +1 inserts a row, -1
//! deletes it, an update is a delete and an insert, and a weight of n stands for n copies
//! (Z-set semantics, as in DBSP). Table DML produces changelogs after it is durable; every
//! operator consumes and produces them; the view's contents absorb the last one.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use millrace_storage::rows::take_rows;

use crate::error::Result;

/// Rows with signed multiplicities.
#[derive(Debug, Clone)]
pub struct Changelog {
    /// The rows.
    pub batch: RecordBatch,
    /// One weight per row of `batch`; never zero after [`Changelog::consolidate`].
    pub weights: Vec<i64>,
}

impl Changelog {
    /// A changelog from rows and their weights (same length).
    pub fn new(batch: RecordBatch, weights: Vec<i64>) -> Self {
        debug_assert_eq!(batch.num_rows(), weights.len());
        Self { batch, weights }
    }

    /// No change.
    pub fn empty(schema: SchemaRef) -> Self {
        Self::new(RecordBatch::new_empty(schema), Vec::new())
    }

    /// Every row of `batch` inserted once.
    pub fn inserts(batch: RecordBatch) -> Self {
        let n = batch.num_rows();
        Self::new(batch, vec![1; n])
    }

    /// Every row of `batch` deleted once.
    pub fn deletes(batch: RecordBatch) -> Self {
        let n = batch.num_rows();
        Self::new(batch, vec![-1; n])
    }

    /// Number of rows (not weighted).
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Schema of the rows.
    pub fn schema(&self) -> SchemaRef {
        self.batch.schema()
    }

    /// The rows where `mask` is true.
    pub fn filter(&self, mask: &BooleanArray) -> Result<Self> {
        let batch = filter_record_batch(&self.batch, mask)?;
        let weights = self
            .weights
            .iter()
            .zip(mask.iter())
            .filter(|(_, m)| m.unwrap_or(false))
            .map(|(w, _)| *w)
            .collect();
        Ok(Self::new(batch, weights))
    }

    /// The rows at `indices`, in that order.
    pub fn take(&self, indices: &[u32]) -> Result<Self> {
        let batch = take_rows(&self.batch, &UInt32Array::from(indices.to_vec()))?;
        let weights = indices.iter().map(|&i| self.weights[i as usize]).collect();
        Ok(Self::new(batch, weights))
    }

    /// `len` rows from `offset` on (zero-copy).
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        Self::new(
            self.batch.slice(offset, len),
            self.weights[offset..offset + len].to_vec(),
        )
    }

    /// Bytes the rows' buffers take (a slice counts its whole buffers).
    pub fn bytes(&self) -> usize {
        self.batch.get_array_memory_size() + self.weights.len() * std::mem::size_of::<i64>()
    }

    /// Bytes of the rows themselves (a slice counts only its part of the buffers).
    pub fn slice_bytes(&self) -> usize {
        let columns: usize = (self.batch.columns().iter())
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
            .sum();
        columns + self.weights.len() * std::mem::size_of::<i64>()
    }

    /// The rows re-labelled with `schema` (same column count), casting columns whose type
    /// differs (a union's inputs may differ in nullability or, rarely, in type).
    pub fn with_schema(&self, schema: &SchemaRef) -> Result<Self> {
        let columns = conform_columns(self.batch.columns(), schema, self.batch.num_rows())?;
        Ok(Self::new(
            make_batch(schema, columns, self.batch.num_rows())?,
            self.weights.clone(),
        ))
    }

    /// Concatenates changelogs with one schema.
    pub fn concat(schema: &SchemaRef, parts: Vec<Changelog>) -> Result<Self> {
        let schema = loose(schema);
        let mut batches = Vec::with_capacity(parts.len());
        let mut weights = Vec::new();
        for part in parts {
            if part.is_empty() {
                continue;
            }
            let columns = conform_columns(part.batch.columns(), &schema, part.len())?;
            batches.push(make_batch(&schema, columns, part.len())?);
            weights.extend(part.weights);
        }
        Ok(Self::new(concat_batches(&schema, &batches)?, weights))
    }

    /// Sums the weights of identical rows and drops rows whose weight sums to zero.
    pub fn consolidate(mut self) -> Result<Self> {
        if self.is_empty() {
            return Ok(self);
        }
        if self.len() == 1 {
            if self.weights[0] == 0 {
                self = self.filter(&BooleanArray::from(vec![false]))?;
            }
            return Ok(self);
        }
        let codec = RowCodec::for_schema(&self.batch.schema())?;
        let rows = codec.encode(self.batch.columns(), self.len())?;
        let rows: Vec<&[u8]> = (0..self.len()).map(|i| rows.row(i)).collect();
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(rows.len());
        let mut order: Vec<(u32, i64)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let w = self.weights[i];
            match first.get(row) {
                Some(&slot) => order[slot].1 += w,
                None => {
                    first.insert(row, order.len());
                    order.push((i as u32, w));
                }
            }
        }
        let kept: Vec<(u32, i64)> = order.into_iter().filter(|(_, w)| *w != 0).collect();
        if kept.len() == self.len() && kept.iter().enumerate().all(|(i, (r, _))| *r as usize == i) {
            return Ok(self);
        }
        let indices: Vec<u32> = kept.iter().map(|(r, _)| *r).collect();
        let batch = take_rows(&self.batch, &UInt32Array::from(indices))?;
        Ok(Self::new(batch, kept.into_iter().map(|(_, w)| w).collect()))
    }
}

/// A schema with every column nullable: changelog rows of outer joins and aggregates may
/// carry NULLs where the source column could not.
pub fn loose(schema: &SchemaRef) -> SchemaRef {
    if schema.fields().iter().all(|f| f.is_nullable()) {
        return schema.clone();
    }
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| Field::clone(f).with_nullable(true))
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

/// A converter whose encodings compare like the ORDER BY `order` over rows of `schema`.
pub fn sort_converter(
    order: &[datafusion::physical_expr::PhysicalSortExpr],
    schema: &Schema,
) -> Result<RowConverter> {
    Ok(RowConverter::new(
        order
            .iter()
            .map(|s| {
                Ok(SortField::new_with_options(
                    s.expr.data_type(schema)?,
                    s.options,
                ))
            })
            .collect::<Result<_>>()?,
    )?)
}

/// A converter between rows of `schema` and their comparable byte encoding.
pub fn row_converter(schema: &Schema) -> Result<RowConverter> {
    Ok(RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}

/// A batch of `schema` from columns that may differ from it in type (they are cast) and
/// that may be none at all (then `rows` gives the row count).
pub fn make_batch(schema: &SchemaRef, columns: Vec<ArrayRef>, rows: usize) -> Result<RecordBatch> {
    let schema = loose(schema);
    let columns = conform_columns(&columns, &schema, rows)?;
    Ok(RecordBatch::try_new_with_options(
        schema,
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
    )?)
}

fn conform_columns(columns: &[ArrayRef], schema: &SchemaRef, rows: usize) -> Result<Vec<ArrayRef>> {
    if columns.len() != schema.fields().len() {
        return Err(crate::error::PlanError::Internal(format!(
            "changelog has {} columns, expected {}",
            columns.len(),
            schema.fields().len()
        )));
    }
    let mut out = Vec::with_capacity(columns.len());
    for (column, field) in columns.iter().zip(schema.fields()) {
        if column.data_type() == field.data_type() {
            out.push(column.clone());
        } else if column.null_count() == rows {
            out.push(datafusion::arrow::array::new_null_array(
                field.data_type(),
                rows,
            ));
        } else {
            out.push(cast(column, field.data_type())?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::DataType;

    use super::*;

    #[test]
    fn consolidate_sums_and_drops_zero() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(vec![
                Some(1),
                Some(2),
                Some(1),
                None,
            ]))],
        )
        .unwrap();
        let c = Changelog::new(batch, vec![1, 1, -1, 2])
            .consolidate()
            .unwrap();
        assert_eq!(c.weights, vec![1, 2]);
        assert_eq!(c.weights.iter().sum::<i64>(), 3);
    }
}

/// Row encoding that also works for zero columns (a cross join's key, a projection of no
/// columns), where every row encodes to the empty byte string.
#[derive(Debug)]
pub struct RowCodec {
    converter: Option<RowConverter>,
    types: Vec<DataType>,
}

/// Encoded rows of one batch.
#[derive(Debug)]
pub enum EncodedRows {
    /// Rows of one or more columns.
    Rows(datafusion::arrow::row::Rows),
    /// `n` rows of no columns.
    Empty(usize),
}

impl EncodedRows {
    /// The encoding of row `i`.
    pub fn row(&self, i: usize) -> &[u8] {
        match self {
            EncodedRows::Rows(rows) => rows.row(i).data(),
            EncodedRows::Empty(_) => &[],
        }
    }
}

impl RowCodec {
    /// A codec for columns of `types`.
    pub fn new(types: Vec<DataType>) -> Result<Self> {
        let converter = if types.is_empty() {
            None
        } else {
            Some(RowConverter::new(
                types.iter().map(|t| SortField::new(t.clone())).collect(),
            )?)
        };
        Ok(Self { converter, types })
    }

    /// A codec for rows of `schema`.
    pub fn for_schema(schema: &Schema) -> Result<Self> {
        Self::new(
            schema
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
        )
    }

    /// The column types.
    pub fn types(&self) -> &[DataType] {
        &self.types
    }

    /// Encodes `rows` rows of `columns` (cast to the codec's types where they differ).
    pub fn encode(&self, columns: &[ArrayRef], rows: usize) -> Result<EncodedRows> {
        let Some(converter) = &self.converter else {
            return Ok(EncodedRows::Empty(rows));
        };
        let mut cast_columns = Vec::with_capacity(columns.len());
        for (c, t) in columns.iter().zip(&self.types) {
            cast_columns.push(if c.data_type() == t {
                c.clone()
            } else {
                cast(c, t)?
            });
        }
        Ok(EncodedRows::Rows(converter.convert_columns(&cast_columns)?))
    }

    /// Decodes encoded rows back into columns.
    pub fn decode<'a>(&self, rows: impl Iterator<Item = &'a [u8]>) -> Result<Vec<ArrayRef>> {
        let Some(converter) = &self.converter else {
            return Ok(Vec::new());
        };
        let parser = converter.parser();
        Ok(converter.convert_rows(rows.map(|r| parser.parse(r)))?)
    }
}
