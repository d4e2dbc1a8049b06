//! Server errors and their one mapping to SQLSTATE codes at the wire.
//!
//! Every failure a statement can meet ends up here; [`ServerError::sqlstate`] is the single
//! exhaustive match that decides what a client sees.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;
use millrace_planner::PlanError;
use millrace_planner::error::ObjectClass;
use millrace_storage::StorageError;

/// Errors a statement or connection can end with.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The SQL text does not parse.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// DataFusion failed to plan or run the statement.
    #[error("{}", datafusion_message(.0))]
    DataFusion(#[from] DataFusionError),
    /// The planner or catalog refused the statement.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The durable store failed; the statement was not applied.
    #[error("storage failure, statement not applied: {0}")]
    Storage(#[from] StorageError),
    /// Arrow failed on a batch.
    #[error("{0}")]
    Arrow(#[from] ArrowError),
    /// A construct Millrace does not support (yet).
    #[error("{0} is not supported")]
    NotSupported(String),
    /// A primary-key value would appear twice.
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    UniqueViolation {
        /// Name of the violated constraint (`<table>_pkey`).
        constraint: String,
    },
    /// A NULL went into a NOT NULL column.
    #[error(
        "null value in column \"{column}\" of relation \"{table}\" violates not-null constraint"
    )]
    NotNullViolation {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A value's text does not parse as its column type.
    #[error("invalid input syntax: {0}")]
    InvalidText(String),
    /// COPY data whose shape does not match the table (column count, framing).
    #[error("{0}")]
    BadCopyFormat(String),
    /// Bytes that are not valid UTF-8.
    #[error("invalid byte sequence for encoding \"UTF8\": {0}")]
    InvalidEncoding(String),
    /// A statement in a transaction block that already failed.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
    /// A savepoint command outside a transaction block.
    #[error("{0} can only be used in transaction blocks")]
    NoTransaction(&'static str),
    /// ROLLBACK TO / RELEASE of a savepoint that does not exist.
    #[error("savepoint \"{0}\" does not exist")]
    UnknownSavepoint(String),
    /// A concurrent write changed rows this transaction wrote.
    #[error("could not serialize access due to concurrent update")]
    SerializationFailure,
    /// The statement was cancelled (CancelRequest).
    #[error("canceling statement due to user request")]
    Canceled,
    /// The statement ran past `statement_timeout`.
    #[error("canceling statement due to statement timeout")]
    StatementTimeout,
    /// A start-up failed to find a file the data directory refers to in the object store,
    /// and the data directory was last run with another one.
    #[error(
        "{cause}; this data directory's last run kept its spilled data in {recorded}, not \
         {given}: start with --object-store {recorded}, or copy those files to {given} first"
    )]
    ObjectStoreMoved {
        /// The object store of the last run.
        recorded: String,
        /// The object store given now.
        given: String,
        /// What failed.
        cause: String,
    },
    /// An unknown configuration parameter.
    #[error("unrecognized configuration parameter \"{0}\"")]
    UnknownSetting(String),
    /// A configuration parameter got a bad value.
    #[error("invalid value for parameter \"{name}\": \"{value}\"")]
    InvalidSetting {
        /// The parameter.
        name: String,
        /// The rejected value.
        value: String,
    },
    /// The client broke the protocol (bad COPY data framing and the like).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The database named at startup does not exist.
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    /// An object is still in use (DROP DATABASE of the current database).
    #[error("{0}")]
    ObjectInUse(String),
    /// An external system a connector talks to failed (broker unreachable, topic missing).
    #[error("{0}")]
    Connector(String),
    /// The statement does not apply to this kind of object (INSERT into a source).
    #[error("{0}")]
    WrongObjectType(String),
    /// An output column name appears twice where names must be unique.
    #[error("column \"{0}\" specified more than once")]
    DuplicateColumn(String),
    /// An object is not ready for this (a materialized view still backfilling).
    #[error("{0}")]
    ObjectNotReady(String),
    /// A SUBSCRIBE reader fell further behind than `subscribe_max_buffer` allows.
    #[error("{0}")]
    SubscriberTooSlow(String),
    /// The client's connection failed while the server was streaming to it.
    #[error("connection to client lost: {0}")]
    ClientGone(String),
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
    /// A lock whose holder panicked.
    #[error(transparent)]
    Poisoned(#[from] millrace_storage::error::Poisoned),
}

/// Result type of the server crate.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

impl From<ParserError> for ServerError {
    fn from(e: ParserError) -> Self {
        ServerError::Syntax(parser_message(&e))
    }
}

/// Whether an error is the user's doing or ours (for logs and the security log later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad SQL, bad data, a missing object, a constraint.
    User,
    /// Storage or internal failure.
    Internal,
}

impl ServerError {
    /// The SQLSTATE code sent to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ServerError::Syntax(_) => "42601",
            ServerError::DataFusion(e) => datafusion_sqlstate(e),
            ServerError::Plan(e) => match e {
                PlanError::DataFusion(e) => datafusion_sqlstate(e),
                PlanError::Arrow(e) => arrow_sqlstate(e),
                PlanError::Storage(_) => "58030",
                PlanError::UndefinedObject { kind, .. } => match kind {
                    ObjectClass::Table
                    | ObjectClass::View
                    | ObjectClass::Relation
                    | ObjectClass::MaterializedView => "42P01",
                    ObjectClass::Schema => "3F000",
                    ObjectClass::Database => "3D000",
                    ObjectClass::Column => "42703",
                    ObjectClass::Index | ObjectClass::Sink => "42704",
                },
                PlanError::DuplicateObject { kind, .. } => match kind {
                    ObjectClass::Database => "42P04",
                    ObjectClass::Schema => "42P06",
                    ObjectClass::Column => "42701",
                    _ => "42P07",
                },
                PlanError::DependentObjects { .. } => "2BP01",
                PlanError::Unsupported(_) => "0A000",
                PlanError::ViewFailed { .. } => "XX000",
                PlanError::ViewNotReady { .. } => "55000",
                PlanError::Internal(_) | PlanError::Poisoned(_) => "XX000",
            },
            ServerError::Storage(_) | ServerError::ObjectStoreMoved { .. } => "58030",
            ServerError::Arrow(e) => arrow_sqlstate(e),
            ServerError::NotSupported(_) => "0A000",
            ServerError::UniqueViolation { .. } => "23505",
            ServerError::NotNullViolation { .. } => "23502",
            ServerError::InvalidText(_) => "22P02",
            ServerError::BadCopyFormat(_) => "22P04",
            ServerError::InvalidEncoding(_) => "22021",
            ServerError::InFailedTransaction => "25P02",
            ServerError::NoTransaction(_) => "25P01",
            ServerError::UnknownSavepoint(_) => "3B001",
            ServerError::SerializationFailure => "40001",
            ServerError::Canceled | ServerError::StatementTimeout => "57014",
            ServerError::UnknownSetting(_) => "42704",
            ServerError::InvalidSetting { .. } => "22023",
            ServerError::Protocol(_) => "08P01",
            ServerError::UnknownDatabase(_) => "3D000",
            ServerError::ObjectInUse(_) => "55006",
            ServerError::WrongObjectType(_) => "42809",
            ServerError::Connector(_) => "58000",
            ServerError::DuplicateColumn(_) => "42701",
            ServerError::ObjectNotReady(_) => "55000",
            ServerError::SubscriberTooSlow(_) => "54000",
            ServerError::ClientGone(_) => "08006",
            ServerError::Internal(_) | ServerError::Poisoned(_) => "XX000",
        }
    }

    /// Whether the error is the user's doing.
    pub fn class(&self) -> ErrorClass {
        match self.sqlstate() {
            "58030" | "XX000" => ErrorClass::Internal,
            _ => ErrorClass::User,
        }
    }
}

fn parser_message(e: &ParserError) -> String {
    match e {
        ParserError::ParserError(m) | ParserError::TokenizerError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => "statement is nested too deeply".into(),
    }
}

fn datafusion_message(e: &DataFusionError) -> String {
    match e.find_root() {
        DataFusionError::SQL(p, _) => parser_message(p),
        DataFusionError::Plan(m)
        | DataFusionError::Execution(m)
        | DataFusionError::NotImplemented(m)
        | DataFusionError::Configuration(m) => m.clone(),
        DataFusionError::ArrowError(a, _) => a.to_string(),
        DataFusionError::External(x) => x.to_string(),
        other => other.to_string(),
    }
}

fn datafusion_sqlstate(e: &DataFusionError) -> &'static str {
    use datafusion::common::SchemaError;
    let root = e.find_root();
    match root {
        DataFusionError::SQL(_, _) => "42601",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::SchemaError(s, _) => match s.as_ref() {
            SchemaError::FieldNotFound { .. } => "42703",
            SchemaError::AmbiguousReference { .. } => "42702",
            SchemaError::DuplicateQualifiedField { .. }
            | SchemaError::DuplicateUnqualifiedField { .. } => "42701",
        },
        DataFusionError::ArrowError(a, _) => arrow_sqlstate(a),
        DataFusionError::ResourcesExhausted(_) => "53200",
        DataFusionError::External(x) => {
            if let Some(s) = x.downcast_ref::<ServerError>() {
                s.sqlstate()
            } else if let Some(a) = x.downcast_ref::<ArrowError>() {
                arrow_sqlstate(a)
            } else {
                "XX000"
            }
        }
        DataFusionError::Plan(m) | DataFusionError::Execution(m) => message_sqlstate(m),
        _ => "XX000",
    }
}

/// Marks the row of [`MESSAGE_SQLSTATES`] whose state [`cast_sqlstate`] tells.
const CAST: &str = "cast";

/// SQLSTATEs of DataFusion errors that carry only a message (`Plan`, `Execution`): the first
/// row all of whose words the lower-cased message contains wins; a cast is told apart by
/// [`cast_sqlstate`]. Typed errors (schema, Arrow, resources) never get here.
const MESSAGE_SQLSTATES: &[(&[&str], &str)] = &[
    // NOTE: before the rows below, whose words a plan's text can hold (`CAST(..)`).
    (&["must be in group by"], "42803"),
    (&["must appear in the group by"], "42803"),
    (&["does not satisfy", "requirements"], "XX000"),
    (&["non-nullable but contains null"], "23502"),
    (&["not found", "table"], "42P01"),
    (&["not found", "view"], "42P01"),
    (&["no field named"], "42703"),
    (&["column", "not found"], "42703"),
    (&["date out of range"], "22008"),
    (&["divide by zero"], "22012"),
    (&["division by zero"], "22012"),
    (&["overflow"], "22003"),
    // NOTE: "cast " as in "Cannot cast string", not a plan's `CAST(` (seed 90 query 5694:
    // a HAVING error that displayed `pg_cast_tag(..)` was 22P02).
    (&["cast "], CAST),
    (&["casting"], CAST),
    (&["cannot parse"], "22P02"),
    (&["invalid", "input"], "22P02"),
    (&["invalid function"], "42883"),
    (&["no function matches"], "42883"),
    (&["coerce"], "42804"),
    (&["mismatch"], "42804"),
    (&["does not support"], "42804"),
    (&["cannot infer common"], "42804"),
    (&["already exists"], "42P07"),
    (&["unsupported"], "0A000"),
];

/// SQLSTATE for DataFusion errors that only carry a message (see [`MESSAGE_SQLSTATES`]).
fn message_sqlstate(m: &str) -> &'static str {
    let lower = m.to_ascii_lowercase();
    match MESSAGE_SQLSTATES
        .iter()
        .find(|(words, _)| words.iter().all(|w| lower.contains(w)))
    {
        Some((_, state)) if *state == CAST => cast_sqlstate(m),
        Some((_, state)) => state,
        None => "42000",
    }
}

/// SQLSTATE of a failed cast: a value out of the target type's range is 22003 (as
/// PostgreSQL's "integer out of range"), text that is not a value of the type is 22P02.
fn cast_sqlstate(m: &str) -> &'static str {
    let lower = m.to_ascii_lowercase();
    if lower.contains("overflow") || lower.contains("too large") {
        return "22003";
    }
    // Arrow: "Can't cast value 3000000000 to type Int32" (a number that does not fit).
    if lower.contains("can't cast value") {
        return "22003";
    }
    // Arrow: "Cannot cast string '99999999999' to value of Int32 type": out of range when
    // the text is an integer (for an integer type) or a number (for a float type); '1.5'
    // for an integer is invalid text, as in PostgreSQL.
    if let Some(rest) = m.split_once("string '").map(|(_, r)| r)
        && let Some((text, target)) = rest.split_once('\'')
    {
        let text = text.trim();
        let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
        let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let float_target = target.contains("Float");
        if integer || float_target && text.parse::<f64>().is_ok() {
            return "22003";
        }
    }
    "22P02"
}

fn arrow_sqlstate(e: &ArrowError) -> &'static str {
    match e {
        ArrowError::DivideByZero => "22012",
        ArrowError::ArithmeticOverflow(_) => "22003",
        ArrowError::CastError(m) => cast_sqlstate(m),
        ArrowError::ParseError(m) => {
            if m.to_ascii_lowercase().contains("overflow") || m.contains("too large") {
                "22003"
            } else {
                "22P02"
            }
        }
        ArrowError::InvalidArgumentError(m) if m.contains("non-nullable but contains null") => {
            "23502"
        }
        ArrowError::InvalidArgumentError(_) => "22023",
        _ => "XX000",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_for_common_failures() {
        assert_eq!(ServerError::Syntax("x".into()).sqlstate(), "42601");
        let df = DataFusionError::Plan("table 'millrace.public.nope' not found".into());
        assert_eq!(ServerError::from(df).sqlstate(), "42P01");
        let cast = DataFusionError::ArrowError(
            Box::new(ArrowError::CastError(
                "Cannot cast string 'x' to value of Int32 type".into(),
            )),
            None,
        );
        assert_eq!(ServerError::from(cast).sqlstate(), "22P02");
        // Regression: a value out of the column's range was 22P02 (invalid text), where
        // PostgreSQL says 22003 (out of range).
        for m in [
            "Can't cast value 3000000000 to type Int32",
            "Cannot cast string '99999999999' to value of Int32 type",
            "Cannot cast string '-1e400' to value of Float64 type",
        ] {
            let cast = DataFusionError::ArrowError(Box::new(ArrowError::CastError(m.into())), None);
            assert_eq!(ServerError::from(cast).sqlstate(), "22003", "{m}");
            let message = DataFusionError::Execution(format!("Cast error: {m}"));
            assert_eq!(ServerError::from(message).sqlstate(), "22003", "{m}");
        }
        for m in [
            "Cannot cast string '1.5' to value of Int32 type",
            "Cannot cast string 'abc' to value of Float64 type",
            "Cannot cast string '' to value of Int64 type",
        ] {
            let cast = DataFusionError::ArrowError(Box::new(ArrowError::CastError(m.into())), None);
            assert_eq!(ServerError::from(cast).sqlstate(), "22P02", "{m}");
        }
        assert_eq!(
            ServerError::from(DataFusionError::NotImplemented("x".into())).sqlstate(),
            "0A000"
        );
        let ctx = DataFusionError::Context(
            "outer".into(),
            Box::new(DataFusionError::ArrowError(
                Box::new(ArrowError::DivideByZero),
                None,
            )),
        );
        assert_eq!(ServerError::from(ctx).sqlstate(), "22012");
        assert_eq!(
            ServerError::UniqueViolation {
                constraint: "t_pkey".into()
            }
            .sqlstate(),
            "23505"
        );
    }

    /// What DataFusion itself raises for common mistakes, mapped to PostgreSQL's SQLSTATEs:
    /// the statements run through a real context, so a change of DataFusion's wording or
    /// error type shows here.
    #[tokio::test]
    async fn datafusion_errors_of_common_mistakes_map_to_postgresql_states() {
        let ctx = datafusion::prelude::SessionContext::new();
        let cases = [
            ("SELECT * FROM nope", "42P01"),
            ("SELECT nope FROM (VALUES (1)) AS t(a)", "42703"),
            ("SELECT 1 / 0", "22012"),
            ("SELECT CAST('x' AS INT)", "22P02"),
            ("SELECT CAST(3000000000 AS INT)", "22003"),
            ("SELECT no_such_function(1)", "42883"),
            (
                "SELECT a, b FROM (VALUES (1, 2)) AS t(a, b) GROUP BY a",
                "42803",
            ),
            (
                "SELECT a FROM (VALUES (1, 2)) AS t(a, b) GROUP BY a HAVING b > CAST(1 AS INT)",
                "42803",
            ),
            ("SELEC 1", "42601"),
            (
                "SELECT a FROM (VALUES (1)) AS t(a), (VALUES (2)) AS u(a)",
                "42702",
            ),
        ];
        for (sql, state) in cases {
            let error = match ctx.sql(sql).await {
                Ok(df) => match df.collect().await {
                    Ok(_) => panic!("{sql} succeeded"),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            let message = error.to_string();
            assert_eq!(
                ServerError::from(error).sqlstate(),
                state,
                "{sql}: {message}"
            );
        }
    }

    /// What must stay textual: DataFusion messages with no typed error, each row of
    /// [`MESSAGE_SQLSTATES`] and its neighbours' order.
    #[test]
    fn message_only_errors_map_by_their_words() {
        let cases = [
            (
                "Invalid batch column at '0' is non-nullable but contains null",
                "23502",
            ),
            ("table 'millrace.public.nope' not found", "42P01"),
            ("view 'v' not found", "42P01"),
            ("No field named x.", "42703"),
            ("column 'y' not found", "42703"),
            ("Divide by zero error", "22012"),
            (
                "Arithmetic overflow: Overflow happened on: 9223372036854775807 + 1",
                "22003",
            ),
            (
                "Cast error: Cannot cast string 'abc' to value of Int32 type",
                "22P02",
            ),
            (
                "Cast error: Can't cast value 3000000000 to type Int32",
                "22003",
            ),
            ("Cannot parse 'x' as date", "22P02"),
            ("Invalid function 'nope'", "42883"),
            ("Cannot coerce arithmetic expression Utf8 + Int64", "42804"),
            ("Table 't' already exists", "42P07"),
            ("Unsupported ast node in sqltorel", "0A000"),
            ("something else entirely", "42000"),
        ];
        for (message, state) in cases {
            let plan = DataFusionError::Plan(message.into());
            assert_eq!(ServerError::from(plan).sqlstate(), state, "{message}");
            let execution = DataFusionError::Execution(message.into());
            assert_eq!(ServerError::from(execution).sqlstate(), state, "{message}");
        }
    }
}
