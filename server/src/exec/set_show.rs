//! SET, SHOW, RESET and DISCARD: session parameters.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::sql::sqlparser::ast::{Expr, Reset, Set, Statement, Value};

use crate::error::{Result, ServerError};
use crate::exec::output::Output;
use crate::session::Session;

/// Fault injection, only on a server started with `--failpoints`:
/// `SET millrace.inject_write_failures = n` makes the next `n` durable commits fail;
/// `SET millrace.slow_views_us_per_row = n` holds every view step up n µs per input row;
/// `SET millrace.fail_view_steps = 'view:n'` makes the next `n` steps of a view fail;
/// `SET millrace.inject_object_store_failures = n` makes the next `n` PUTs of evicted chunks
/// fail.
fn inject_fault(session: &Session, name: &str, value: &str) -> Result<Output> {
    if !session.engine.failpoints {
        return Err(ServerError::NotSupported(
            "fault injection on a server started without --failpoints".into(),
        ));
    }
    let invalid = || ServerError::InvalidSetting {
        name: name.into(),
        value: value.into(),
    };
    if name == "millrace.fail_view_steps" {
        let (view, n) = value.rsplit_once(':').ok_or_else(invalid)?;
        let n: u32 = n.trim().parse().map_err(|_| invalid())?;
        session.engine.views.inject_step_failures(view.trim(), n);
        return Ok(Output::command("SET"));
    }
    let n: u32 = value
        .trim()
        .parse()
        .map_err(|_| ServerError::InvalidSetting {
            name: name.into(),
            value: value.into(),
        })?;
    if name == "millrace.inject_object_store_failures" {
        session.engine.cache.cold.inject_write_failures(n.into());
    } else if name == "millrace.slow_views_us_per_row" {
        session
            .engine
            .views
            .slow_us_per_row
            .store(n.into(), std::sync::atomic::Ordering::Relaxed);
    } else {
        session.engine.store().inject_write_failures(n);
    }
    Ok(Output::command("SET"))
}

/// Runs a settings statement.
pub fn run(session: &mut Session, statement: Statement) -> Result<Output> {
    match statement {
        Statement::Set(set) => {
            match set {
                Set::SingleAssignment {
                    variable, values, ..
                } => {
                    let name = variable.to_string().to_ascii_lowercase();
                    let value = values.iter().map(value_text).collect::<Vec<_>>().join(", ");
                    if name == "millrace.inject_write_failures"
                        || name == "millrace.slow_views_us_per_row"
                        || name == "millrace.fail_view_steps"
                        || name == "millrace.inject_object_store_failures"
                    {
                        return inject_fault(session, &name, &value);
                    }
                    if value.eq_ignore_ascii_case("default") {
                        session.settings.reset(&name)?;
                    } else {
                        session.settings.set(&name, &value)?;
                    }
                }
                Set::SetTimeZone { value, .. } => {
                    session.settings.set("timezone", &value_text(&value))?;
                }
                Set::SetNames { charset_name, .. } => {
                    session
                        .settings
                        .set("client_encoding", &charset_name.to_string())?;
                }
                Set::SetTransaction { .. }
                | Set::SetSessionAuthorization(_)
                | Set::SetRole { .. } => {}
                other => {
                    return Err(ServerError::NotSupported(format!("{other}")));
                }
            }
            session.sync_settings();
            Ok(Output::command("SET"))
        }
        Statement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("");
            let name = match name.as_str() {
                "timezone" | "time zone" => "timezone".to_string(),
                "transactionisolationlevel" => "transaction_isolation".to_string(),
                other => other.to_string(),
            };
            if name == "all" {
                let (names, values): (Vec<String>, Vec<String>) = session
                    .settings
                    .all()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .unzip();
                return rows(&["name", "setting"], vec![names, values]);
            }
            let value = session.settings.get(&name)?;
            rows(&[display_name(&name)], vec![vec![value]])
        }
        Statement::ShowVariables { .. } => Err(ServerError::NotSupported("SHOW VARIABLES".into())),
        Statement::Reset(reset) => {
            match reset.reset {
                Reset::ALL => session.settings.reset("all")?,
                Reset::ConfigurationParameter(name) => session.settings.reset(&name.to_string())?,
            }
            session.sync_settings();
            Ok(Output::command("RESET"))
        }
        Statement::Discard { .. } => {
            session.settings.reset("all")?;
            session.sync_settings();
            Ok(Output::command("DISCARD ALL"))
        }
        other => Err(ServerError::Internal(format!(
            "not a settings statement: {other}"
        ))),
    }
}

/// PostgreSQL spells a few parameters with capitals in SHOW's column name.
fn display_name(name: &str) -> &str {
    match name {
        "timezone" => "TimeZone",
        "datestyle" => "DateStyle",
        "intervalstyle" => "IntervalStyle",
        other => other,
    }
}

fn value_text(expr: &Expr) -> String {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            Value::Number(n, _) => n.to_string(),
            Value::Boolean(b) => {
                if *b {
                    "on".into()
                } else {
                    "off".into()
                }
            }
            other => other.to_string(),
        },
        Expr::Identifier(ident) => ident.value.clone(),
        other => other.to_string(),
    }
}

fn rows(names: &[&str], columns: Vec<Vec<String>>) -> Result<Output> {
    let schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays = columns
        .into_iter()
        .map(|c| Arc::new(StringArray::from(c)) as _)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays)?;
    Ok(Output::Rows {
        schema,
        batches: vec![batch],
    })
}
