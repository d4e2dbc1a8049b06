//! Test-only helpers for the operator unit tests: changelog literals and their comparison
//! (after Feldera's `zset!` and RisingWave's `from_pretty`).
//!
//! A changelog literal is a small table: a header naming the columns, then one row per
//! line with its weight after a `|` (a row without one is inserted once). Values are
//! separated by blanks; `null` is NULL; a value with blanks, an empty one or the word
//! null itself is quoted: `'a b'`, `''`, `'null'`. Values are read as the column's type.
//!
//! ```text
//!     k  v    | w
//!     a  1    | +1
//!     b  null | -2
//! ```
//!
//! [`assert_changelog`] consolidates an operator's output and compares it with such a
//! literal, row by row and weight by weight, in a stable order.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::common::ScalarValue;

use crate::changelog::{Changelog, make_batch};
use crate::ops::Operator;

/// A schema from `name:type` pairs separated by blanks, every column nullable. Types:
/// `i32`, `i64`, `u64`, `f64`, `bool`, `utf8`.
pub(crate) fn schema(spec: &str) -> SchemaRef {
    let fields: Vec<Field> = spec
        .split_whitespace()
        .map(|column| {
            let (name, ty) = column
                .split_once(':')
                .unwrap_or_else(|| panic!("column `{column}` is not name:type"));
            let data_type = match ty {
                "i32" => DataType::Int32,
                "i64" => DataType::Int64,
                "u64" => DataType::UInt64,
                "f64" => DataType::Float64,
                "bool" => DataType::Boolean,
                "utf8" => DataType::Utf8,
                other => panic!("unknown type `{other}` in a test schema"),
            };
            Field::new(name, data_type, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The columns of `left` followed by those of `right` (a join's combined schema).
pub(crate) fn concat_schemas(left: &SchemaRef, right: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = left
        .fields()
        .iter()
        .chain(right.fields().iter())
        .map(|f| Field::clone(f))
        .collect();
    Arc::new(Schema::new(fields))
}

/// Splits a line into values: blank-separated, `'...'` quoted (quoted values are never
/// NULL). Returns (text, quoted).
fn tokens(line: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '\'' {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => panic!("unterminated quote in `{line}`"),
                }
            }
            out.push((value, true));
        } else {
            let mut value = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
            out.push((value, false));
        }
    }
    out
}

/// Parses a changelog literal (see the module doc) into a changelog of `schema`. The
/// header must name the schema's columns in order; a literal of only a header is empty.
#[track_caller]
pub(crate) fn changelog(schema: &SchemaRef, text: &str) -> Changelog {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no header in {text:?}"));
    let (names, weight_name) = header.split_once('|').unwrap_or((header, ""));
    let names: Vec<&str> = names.split_whitespace().collect();
    let expected: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, expected, "header of the literal vs the schema");
    assert!(
        matches!(weight_name.trim(), "" | "w"),
        "the weight column is called w"
    );
    let mut columns: Vec<Vec<ScalarValue>> = vec![Vec::new(); schema.fields().len()];
    let mut weights = Vec::new();
    for line in lines {
        let (values, weight) = line.split_once('|').unwrap_or((line, "+1"));
        let values = tokens(values);
        assert_eq!(values.len(), names.len(), "values in row `{line}`");
        for ((value, quoted), (column, field)) in values
            .into_iter()
            .zip(columns.iter_mut().zip(schema.fields()))
        {
            let scalar = if value == "null" && !quoted {
                ScalarValue::try_from(field.data_type())
            } else {
                ScalarValue::try_from_string(value.clone(), field.data_type())
            };
            column.push(
                scalar.unwrap_or_else(|e| panic!("`{value}` is not a {}: {e}", field.data_type())),
            );
        }
        let weight = weight.trim();
        weights.push(
            weight
                .strip_prefix('+')
                .unwrap_or(weight)
                .parse::<i64>()
                .unwrap_or_else(|e| panic!("weight `{weight}` in row `{line}`: {e}")),
        );
    }
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(values, field)| {
            if values.is_empty() {
                datafusion::arrow::array::new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(values).unwrap()
            }
        })
        .collect();
    Changelog::new(make_batch(schema, arrays, weights.len()).unwrap(), weights)
}

/// One value as the literals write it.
fn render(array: &dyn Array, row: usize) -> String {
    if array.is_null(row) {
        return "null".into();
    }
    let text = array_value_to_string(array, row).unwrap();
    let needs_quotes = text.is_empty() || text == "null" || text.contains(char::is_whitespace);
    if needs_quotes && matches!(array.data_type(), DataType::Utf8 | DataType::LargeUtf8) {
        format!("'{text}'")
    } else {
        text
    }
}

/// Each row of `log` as text (values separated by one blank) with its weight, rows as
/// emitted (not consolidated).
pub(crate) fn raw_rows(log: &Changelog) -> Vec<(String, i64)> {
    (0..log.len())
        .map(|i| {
            let values: Vec<String> = log
                .batch
                .columns()
                .iter()
                .map(|c| render(c.as_ref(), i))
                .collect();
            (values.join(" "), log.weights[i])
        })
        .collect()
}

/// The rows of `log` consolidated (weights of equal rows summed, zero weights dropped) and
/// sorted by their text.
pub(crate) fn rows(log: &Changelog) -> Vec<(String, i64)> {
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for (row, w) in raw_rows(log) {
        *sums.entry(row).or_insert(0) += w;
    }
    sums.into_iter().filter(|(_, w)| *w != 0).collect()
}

/// Asserts that `actual` is the change `expected` (a literal over `actual`'s schema) as a
/// Z-set, and that the operator emitted it consolidated: no zero weight, no row twice.
#[track_caller]
pub(crate) fn assert_changelog(actual: &Changelog, expected: &str) {
    let expected = rows(&changelog(&actual.schema(), expected));
    let got = rows(actual);
    assert_eq!(
        got,
        expected,
        "\n   got: {got:#?}\nwanted: {expected:#?}\n(raw output: {:?})",
        raw_rows(actual)
    );
    assert_eq!(
        raw_rows(actual).len(),
        got.len(),
        "output not consolidated: {:?}",
        raw_rows(actual)
    );
}

/// One epoch of a single-input operator.
#[track_caller]
pub(crate) fn step(op: &mut dyn Operator, input: Changelog) -> Changelog {
    op.step(vec![input]).unwrap()
}

/// A large epoch held back (`StateControl::Hold`): `steps` (each must emit nothing), with
/// all of `op`'s state evicted before each step and before the release when `evicting` (it
/// must be attached to a warm tier), then released a key per step. Returns the released
/// rows, sorted, and the state entries read back before the release.
pub(crate) fn held_epoch(
    op: &mut dyn Operator,
    schema: &SchemaRef,
    steps: &[&str],
    evicting: bool,
) -> (Vec<(String, i64)>, u64) {
    use crate::ops::StateControl;
    op.control(StateControl::Hold).unwrap();
    for text in steps {
        if evicting {
            op.control(StateControl::Evict(1.0)).unwrap();
        }
        assert!(step(op, changelog(schema, text)).is_empty(), "{text}");
    }
    let fetched = op.state().counters.fetched;
    if evicting {
        op.control(StateControl::Evict(1.0)).unwrap();
    }
    op.control(StateControl::Release(1)).unwrap();
    let mut out = Vec::new();
    while op.control(StateControl::Held).unwrap() > 0 {
        out.extend(raw_rows(&step(op, Changelog::empty(schema.clone()))));
    }
    out.sort();
    (out, fetched)
}

/// One epoch of a two-input operator.
#[track_caller]
pub(crate) fn step2(op: &mut dyn Operator, left: Changelog, right: Changelog) -> Changelog {
    op.step(vec![left, right]).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_parse_with_types_nulls_quotes_and_weights() {
        let s = schema("k:utf8 v:i64 f:f64");
        let log = changelog(
            &s,
            "
            k      v    f    | w
            a      1    2.5  | +1
            'x y'  null 0    | -2
            ''     3    null
            'null' 4    1    | 3
            ",
        );
        assert_eq!(log.weights, vec![1, -2, 1, 3]);
        assert_eq!(
            raw_rows(&log),
            vec![
                ("a 1 2.5".to_string(), 1),
                ("'x y' null 0.0".to_string(), -2),
                ("'' 3 null".to_string(), 1),
                ("'null' 4 1.0".to_string(), 3),
            ]
        );
        assert!(log.batch.column(0).is_valid(3), "quoted null is a string");
        assert!(log.batch.column(1).is_null(1));
        assert!(changelog(&s, "k v f | w").is_empty());
    }

    #[test]
    fn rows_consolidate_and_sort() {
        let s = schema("k:utf8 v:i64");
        let log = changelog(
            &s,
            "
            k v | w
            b 2 | +1
            a 1 | +1
            b 2 | -1
            a 1 | +2
            c 3 | -1
            ",
        );
        assert_eq!(
            rows(&log),
            vec![("a 1".to_string(), 3), ("c 3".to_string(), -1)]
        );
        assert_changelog(
            &log.clone().consolidate().unwrap(),
            "k v | w\n c 3 | -1\n a 1 | 3",
        );
    }

    #[test]
    #[should_panic(expected = "got")]
    fn assert_changelog_fails_on_a_wrong_weight() {
        let s = schema("k:utf8");
        assert_changelog(&changelog(&s, "k | w\n a | -1"), "k | w\n a | +1");
    }

    #[test]
    #[should_panic(expected = "not consolidated")]
    fn assert_changelog_fails_on_unconsolidated_output() {
        let s = schema("k:utf8");
        assert_changelog(&changelog(&s, "k | w\n a | +1\n a | +1"), "k | w\n a | +2");
    }

    #[test]
    #[should_panic(expected = "header")]
    fn literal_header_must_match_the_schema() {
        changelog(&schema("k:utf8 v:i64"), "v k | w");
    }
}
