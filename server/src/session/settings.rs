//! Session settings: what `SET`, `SHOW` and `RESET` read and write.
//!
//! Known PostgreSQL parameters keep their PostgreSQL defaults; `TimeZone`, `search_path` and
//! `statement_timeout` change how statements run, the rest are remembered and reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pgwire::types::format::FormatOptions;

use crate::error::{Result, ServerError};

/// A PostgreSQL boolean setting's value (`on`, `true`, `yes`, `1` and their opposites).
fn parse_bool(value: &str) -> Option<bool> {
    match value
        .trim()
        .trim_matches('\'')
        .to_ascii_lowercase()
        .as_str()
    {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parameters a session knows, with their defaults (names lower-case).
const DEFAULTS: &[(&str, &str)] = &[
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("client_min_messages", "notice"),
    ("datestyle", "ISO, MDY"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "off"),
    ("extra_float_digits", "1"),
    ("intervalstyle", "postgres"),
    ("is_superuser", "on"),
    ("lc_messages", "C"),
    ("lc_monetary", "C"),
    ("lc_numeric", "C"),
    ("lc_time", "C"),
    ("max_identifier_length", "63"),
    ("search_path", "\"$user\", public"),
    ("server_encoding", "UTF8"),
    ("server_version", "15.0"),
    ("server_version_num", "150000"),
    ("standard_conforming_strings", "on"),
    ("statement_timeout", "0"),
    ("timezone", "UTC"),
    ("transaction_isolation", "read committed"),
    ("transaction_read_only", "off"),
    ("bytea_output", "hex"),
    ("integer_datetimes", "on"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("jit", "off"),
    ("synchronous_commit", "on"),
    ("row_security", "on"),
    ("work_mem", "4MB"),
    // The most memory one statement's operators may reserve (PostgreSQL units; 0: only the
    // server's query pool applies). See memory/statement.rs.
    ("statement_mem", "0"),
    ("enable_seqscan", "on"),
    ("enable_indexscan", "on"),
    ("geqo", "on"),
    // Epochs a SUBSCRIBE reader may fall behind before it is cut off.
    ("subscribe_max_buffer", "1024"),
    // Whether a read of a view waits for every write acknowledged before it (on), or only
    // for this session's own (off: a consistent but possibly older answer, sooner).
    ("real_time_recency", "on"),
];

/// Settings that are read-only for sessions.
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_version_num",
    "server_encoding",
    "max_identifier_length",
    "integer_datetimes",
    "is_superuser",
];

/// The current settings of one session.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Values by lower-case name.
    values: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            values: DEFAULTS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

impl Settings {
    /// Whether `name` is a parameter this server accepts.
    fn accepts(name: &str) -> bool {
        DEFAULTS.iter().any(|(k, _)| *k == name)
            || name.contains('.')
            // NOTE: RisingWave test files set these; they mean nothing to us yet.
            || name.starts_with("rw_")
            || name.starts_with("streaming_")
    }

    /// Sets a parameter (`SET name = value`).
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let name = name.to_ascii_lowercase();
        if !Self::accepts(&name) {
            return Err(ServerError::UnknownSetting(name));
        }
        if READ_ONLY.contains(&name.as_str()) {
            return Err(ServerError::InvalidSetting {
                name,
                value: value.to_string(),
            });
        }
        let value = match name.as_str() {
            "timezone" => normalize_time_zone(value)?,
            "statement_timeout" => {
                parse_duration_ms(value).ok_or_else(|| ServerError::InvalidSetting {
                    name: name.clone(),
                    value: value.to_string(),
                })?;
                value.to_string()
            }
            "statement_mem" => {
                parse_memory_bytes(value).ok_or_else(|| ServerError::InvalidSetting {
                    name: name.clone(),
                    value: value.to_string(),
                })?;
                value.to_string()
            }
            "real_time_recency" => match parse_bool(value) {
                Some(true) => "on".to_string(),
                Some(false) => "off".to_string(),
                None => {
                    return Err(ServerError::InvalidSetting {
                        name,
                        value: value.to_string(),
                    });
                }
            },
            _ => value.to_string(),
        };
        self.values.insert(name, value);
        Ok(())
    }

    /// Restores a parameter's default (`RESET name`); `RESET ALL` passes `all`.
    pub fn reset(&mut self, name: &str) -> Result<()> {
        let name = name.to_ascii_lowercase();
        if name == "all" {
            *self = Settings::default();
            return Ok(());
        }
        match DEFAULTS.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => {
                self.values.insert(name, v.to_string());
            }
            None if Self::accepts(&name) => {
                self.values.remove(&name);
            }
            None => return Err(ServerError::UnknownSetting(name)),
        }
        Ok(())
    }

    /// The value of a parameter (`SHOW name`).
    pub fn get(&self, name: &str) -> Result<String> {
        let name = name.to_ascii_lowercase();
        match self.values.get(&name) {
            Some(v) => Ok(v.clone()),
            None if Self::accepts(&name) => Ok(String::new()),
            None => Err(ServerError::UnknownSetting(name)),
        }
    }

    /// All parameters (`SHOW ALL`).
    pub fn all(&self) -> impl Iterator<Item = (&String, &String)> {
        self.values.iter()
    }

    /// The statement timeout, if one is set.
    pub fn statement_timeout(&self) -> Option<Duration> {
        let ms = parse_duration_ms(self.values.get("statement_timeout")?)?;
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The most memory one statement may reserve, in bytes (`statement_mem`; 0: no limit of
    /// its own).
    pub fn statement_mem(&self) -> usize {
        self.values
            .get("statement_mem")
            .and_then(|v| parse_memory_bytes(v))
            .unwrap_or(0)
    }

    /// Whether reads of views wait for every acknowledged write (`real_time_recency`).
    pub fn real_time_recency(&self) -> bool {
        self.values
            .get("real_time_recency")
            .is_none_or(|v| v == "on")
    }

    /// The time zone as DataFusion wants it.
    pub fn time_zone(&self) -> String {
        self.values
            .get("timezone")
            .cloned()
            .unwrap_or_else(|| "UTC".into())
    }

    /// The schemas of `search_path`, in order, without `$user`.
    pub fn search_path(&self) -> Vec<String> {
        self.values
            .get("search_path")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .filter(|s| !s.is_empty() && s != "$user")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How values are rendered as text on the wire.
    pub fn format_options(&self) -> Arc<FormatOptions> {
        let mut f = FormatOptions::default();
        if let Some(v) = self.values.get("datestyle") {
            f.date_style = v.clone();
        }
        if let Some(v) = self.values.get("intervalstyle") {
            f.interval_style = v.clone();
        }
        if let Some(v) = self.values.get("bytea_output") {
            f.bytea_output = v.clone();
        }
        if let Some(v) = self.values.get("extra_float_digits")
            && let Ok(n) = v.parse()
        {
            f.extra_float_digits = n;
        }
        f.time_zone = self.time_zone();
        Arc::new(f)
    }
}

/// Parses `statement_timeout` values: `0`, `500`, `'2s'`, `'1min'`, `'100ms'`.
fn parse_duration_ms(value: &str) -> Option<u64> {
    let v = value.trim().trim_matches('\'').trim().to_ascii_lowercase();
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = v[digits.len()..].trim();
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(n * factor)
}

/// A memory setting in PostgreSQL's units (`64MB`, `512kB`, `1GB`; a bare number is kB).
fn parse_memory_bytes(value: &str) -> Option<usize> {
    let v = value.trim().trim_matches('\'').trim();
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: usize = digits.parse().ok()?;
    let factor: usize = match v[digits.len()..].trim() {
        "B" => 1,
        "" | "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// Accepts the time zone names and offsets PostgreSQL users write.
fn normalize_time_zone(value: &str) -> Result<String> {
    let v = value.trim().trim_matches('\'');
    let upper = v.to_ascii_uppercase();
    if upper == "UTC"
        || upper == "GMT"
        || upper == "Z"
        || upper == "ETC/UTC"
        || upper == "DEFAULT"
        || upper == "LOCAL"
    {
        return Ok("UTC".into());
    }
    if v.parse::<datafusion::arrow::array::timezone::Tz>().is_ok() {
        return Ok(v.to_string());
    }
    // Offsets like '+02:00' or '-5'.
    let offset = v.trim_start_matches(['+', '-']);
    if !offset.is_empty() && offset.chars().all(|c| c.is_ascii_digit() || c == ':') {
        let sign = if v.starts_with('-') { '-' } else { '+' };
        let mut parts = offset.split(':');
        let h: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let m: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if h <= 15 && m < 60 {
            return Ok(format!("{sign}{h:02}:{m:02}"));
        }
    }
    Err(ServerError::InvalidSetting {
        name: "TimeZone".into(),
        value: v.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_show_reset() -> Result<()> {
        let mut s = Settings::default();
        s.set("TimeZone", "'Europe/Berlin'")?;
        assert_eq!(s.get("timezone")?, "Europe/Berlin");
        s.set("timezone", "+2")?;
        assert_eq!(s.time_zone(), "+02:00");
        assert!(s.set("timezone", "Mars/Olympus").is_err());
        assert!(s.set("no_such_setting", "1").is_err());
        assert!(s.real_time_recency());
        s.set("real_time_recency", "'OFF'")?;
        assert_eq!(
            (s.real_time_recency(), s.get("real_time_recency")?.as_str()),
            (false, "off")
        );
        assert!(s.set("real_time_recency", "sometimes").is_err());
        s.reset("real_time_recency")?;
        assert!(s.real_time_recency());
        s.set("statement_timeout", "'2s'")?;
        assert_eq!(s.statement_timeout(), Some(Duration::from_secs(2)));
        s.reset("statement_timeout")?;
        assert_eq!(s.statement_timeout(), None);
        assert_eq!(s.statement_mem(), 0);
        s.set("statement_mem", "'64MB'")?;
        assert_eq!(s.statement_mem(), 64 << 20);
        s.set("statement_mem", "512")?;
        assert_eq!(s.statement_mem(), 512 << 10);
        assert!(s.set("statement_mem", "lots").is_err());
        assert!(s.set("statement_mem", "5 parsecs").is_err());
        s.set("search_path", "app, public")?;
        assert_eq!(
            s.search_path(),
            vec!["app".to_string(), "public".to_string()]
        );
        assert!(s.set("server_version", "1").is_err());
        Ok(())
    }
}
