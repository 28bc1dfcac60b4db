//! Times on the wire.
//!
//! Out: RFC 3339 in UTC (`2024-11-28T08:00:00.123Z`), beside the raw milliseconds where a
//! program may want them. In (`from`/`to` query parameters): either an integer number of
//! milliseconds since the Unix epoch or an RFC 3339 time. Durations in (`expiring_within`,
//! `step`) are humantime's: `30s`, `1m`, `12h`, `30d`, `90days`.

use std::time::Duration;

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use tellus_core::TimestampMs;

use crate::ApiError;

/// Formats milliseconds since the Unix epoch as RFC 3339. A time outside what RFC 3339 can
/// write (before year 0 or after 9999) can only come from a corrupt record: an internal error.
pub fn rfc3339(ms: TimestampMs) -> Result<String, ApiError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(ApiError::internal)?
        .format(&Rfc3339)
        .map_err(ApiError::internal)
}

/// Parses a time given as epoch milliseconds or RFC 3339; `name` is the parameter, for the
/// error message.
pub fn parse(name: &str, s: &str) -> Result<TimestampMs, ApiError> {
    if let Ok(ms) = s.parse::<TimestampMs>() {
        return Ok(ms);
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(|t| TimestampMs::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok())
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "{name}: expected milliseconds since the Unix epoch or an RFC 3339 time \
                 such as 2024-11-28T08:00:00Z, found {s:?}"
            ))
        })
}

/// The earliest time RFC 3339 can write, 0000-01-01T00:00:00Z, in ms since the Unix epoch.
pub const MIN_MS: TimestampMs = -62_167_219_200_000;
/// The latest time RFC 3339 can write, 9999-12-31T23:59:59.999Z, in ms since the Unix epoch.
pub const MAX_MS: TimestampMs = 253_402_300_799_999;

/// Parses a humantime duration (`30s`, `1m`, `12h`, `30d`); `name` is the parameter and
/// `examples` what the error message suggests instead.
pub fn duration(name: &str, s: &str, examples: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(s).map_err(|e| {
        ApiError::InvalidQuery(format!(
            "{name}: expected a duration such as {examples}, found {s:?} ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_to_the_same_instant() {
        let ms = 1_732_780_800_123;
        assert_eq!(rfc3339(ms).unwrap(), "2024-11-28T08:00:00.123Z");
        assert_eq!(rfc3339(1_732_780_800_000).unwrap(), "2024-11-28T08:00:00Z");
        assert_eq!(parse("from", "1732780800123").unwrap(), ms);
        assert_eq!(parse("from", "2024-11-28T08:00:00.123Z").unwrap(), ms);
        assert_eq!(parse("from", "2024-11-28T09:00:00.123+01:00").unwrap(), ms);
        assert_eq!(parse("from", "-1").unwrap(), -1);
    }

    #[test]
    fn garbage_is_an_invalid_query() {
        for bad in ["", "yesterday", "2024-11-28", "1.5"] {
            assert!(matches!(parse("to", bad), Err(ApiError::InvalidQuery(_))));
        }
        assert!(rfc3339(i64::MAX).is_err());
    }

    #[test]
    fn the_bounds_are_the_ends_of_rfc_3339() {
        assert_eq!(rfc3339(MIN_MS).unwrap(), "0000-01-01T00:00:00Z");
        assert_eq!(rfc3339(MAX_MS).unwrap(), "9999-12-31T23:59:59.999Z");
        assert!(rfc3339(MAX_MS + 1).is_err());
    }

    #[test]
    fn durations_are_humantime() {
        assert_eq!(
            duration("step", "1m", "1m").unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            duration("step", "1h 30m", "1m").unwrap(),
            Duration::from_secs(5400)
        );
        let Err(ApiError::InvalidQuery(message)) = duration("step", "soon", "1m or 1h") else {
            panic!("soon is no duration");
        };
        assert!(message.starts_with("step: expected a duration such as 1m or 1h"));
    }
}
