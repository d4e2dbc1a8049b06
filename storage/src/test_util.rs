//! Helpers shared by the storage crate's unit tests.

use arrow::array::{Int64Array, RecordBatch};

/// The values of the first column (an Int64 column) of `batches`, in order.
pub fn first_i64s<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> Vec<i64> {
    batches
        .into_iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("an Int64 first column")
                .values()
                .to_vec()
        })
        .collect()
}
