//! CSV records: one line per record, the table's payload columns in order (an empty field
//! is NULL).

use datafusion::arrow::datatypes::FieldRef;

/// The text of each of `fields` in the CSV line `text` (None for an empty field), or why
/// the record is refused.
pub fn fields(fields: &[FieldRef], text: &str) -> Result<Vec<Option<String>>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    let record = reader
        .records()
        .next()
        .ok_or("empty CSV record")?
        .map_err(|e| format!("malformed CSV: {e}"))?;
    if record.len() != fields.len() {
        return Err(format!(
            "{} CSV fields, the table has {} columns",
            record.len(),
            fields.len()
        ));
    }
    Ok(record
        .iter()
        .map(|v| (!v.is_empty()).then(|| v.to_string()))
        .collect())
}
