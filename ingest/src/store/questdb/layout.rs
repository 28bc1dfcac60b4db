//! The QuestDB table: its DDL, and a point as one line-protocol row.
//!
//! ```sql
//! CREATE TABLE telemetry (
//!     device     SYMBOL,    -- the device id
//!     metric     SYMBOL,    -- the metric name
//!     kind       SYMBOL,    -- the value's type: bool, int, float or text
//!     value      DOUBLE,    -- the number (booleans as 0 and 1); null for text
//!     int_value  LONG,      -- integers again, exactly (a double holds 53 bits)
//!     text_value VARCHAR,   -- text values
//!     ts         TIMESTAMP  -- the point's time (the device's, or the server's on receipt)
//! ) TIMESTAMP(ts) PARTITION BY DAY WAL
//! DEDUP UPSERT KEYS(ts, device, metric);
//! ```
//!
//! Symbols make the device and metric filters of every query cheap; the designated
//! timestamp orders each day partition by time; the deduplication keys make a point sent
//! twice (the spool re-sends a batch whose answer it never got) one row.

use questdb::ingress::{Buffer, TimestampMicros};
use tellus_core::Value;

use super::spool::Spooled;

/// The type a point's value had, kept in the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Bool,
    Int,
    Float,
    Text,
}

impl Kind {
    pub fn of(v: &Value) -> Kind {
        match v {
            Value::Bool(_) => Kind::Bool,
            Value::Int(_) => Kind::Int,
            Value::Float(_) => Kind::Float,
            Value::Text(_) => Kind::Text,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Bool, Kind::Int, Kind::Float, Kind::Text]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// The last millisecond QuestDB stores: 9999-12-31T23:59:59.999Z.
const MAX_TS: i64 = 253_402_300_799_999;

/// The table's DDL; a no-op when the table exists.
pub(super) fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS \"{table}\" (\
         device SYMBOL, metric SYMBOL, kind SYMBOL, \
         value DOUBLE, int_value LONG, text_value VARCHAR, ts TIMESTAMP\
         ) TIMESTAMP(ts) PARTITION BY DAY WAL \
         DEDUP UPSERT KEYS(ts, device, metric)"
    )
}

/// Whether `name` can be the table: letters, digits and `_`, at most 127 bytes, so it needs
/// no escaping in the line protocol (SQL quotes it, in case it is a keyword).
pub(super) fn valid_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// Appends `p` to `buf` as one row of `table`. On an error (a value the protocol cannot
/// carry), `buf` is left as it was.
pub(super) fn write_row(buf: &mut Buffer, table: &str, p: &Spooled) -> Result<(), String> {
    if !(0..=MAX_TS).contains(&p.ts) {
        return Err(format!("{} is outside QuestDB's timestamps", p.ts));
    }
    buf.set_marker().map_err(|e| e.msg().to_owned())?;
    let row = (|| {
        buf.table(table)?
            .symbol("device", p.device.as_str())?
            .symbol("metric", p.metric.as_str())?
            .symbol("kind", Kind::of(&p.value).name())?;
        match &p.value {
            Value::Bool(b) => buf.column_f64("value", if *b { 1.0 } else { 0.0 })?,
            Value::Int(i) => buf
                .column_f64("value", *i as f64)?
                .column_i64("int_value", *i)?,
            Value::Float(f) => buf.column_f64("value", *f)?,
            Value::Text(s) => buf.column_str("text_value", s.as_str())?,
        };
        buf.at(TimestampMicros::new(p.ts.saturating_mul(1000)))
    })();
    match row {
        Ok(()) => {
            buf.clear_marker();
            Ok(())
        }
        Err(e) => {
            // The marker was set just above, so rewinding cannot fail.
            let _ = buf.rewind_to_marker();
            Err(e.msg().to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_table_names_need_no_quoting() {
        for k in [Kind::Bool, Kind::Int, Kind::Float, Kind::Text] {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::parse("blob"), None);
        assert!(valid_table_name("telemetry_2"));
        for bad in ["", "1t", "t-x", "t x", "t\"", &"t".repeat(128)] {
            assert!(!valid_table_name(bad), "{bad:?}");
        }
    }
}
