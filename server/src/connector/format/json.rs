//! JSON records: one object per record, the table's payload columns taken by field name
//! (as text, cast to the column type afterwards).

use datafusion::arrow::datatypes::FieldRef;

/// The text of each of `fields` in the JSON object `text` (None for absent or null), or why
/// the record is refused.
pub fn fields(fields: &[FieldRef], text: &str) -> Result<Vec<Option<String>>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let serde_json::Value::Object(object) = value else {
        return Err("a JSON record must be an object".into());
    };
    fields
        .iter()
        .map(|f| match object.get(f.name()) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                Ok(Some(v.to_string()))
            }
            Some(other) => Err(format!(
                "field \"{}\": {} is not a {}",
                f.name(),
                kind(other),
                f.data_type()
            )),
        })
        .collect()
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a scalar",
    }
}
