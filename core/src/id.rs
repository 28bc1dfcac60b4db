//! Device ids: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, except `.` and `..`.
//!
//! The id is the certificate's CN, the MQTT client id and a topic level, so it must never
//! contain a topic separator, a wildcard or anything a shell or URL would need to escape.
//! It is also a URL path segment (`/api/v1/devices/{id}`), where `.` and `..` are dot-segments
//! that clients and proxies resolve away before the request is sent, so those two are refused.

use std::fmt;

/// The longest device id accepted.
pub const MAX_LEN: usize = 64;

/// A validated device id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

/// Why a string is not a device id; the message is meant for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    #[error("device id must not be empty")]
    Empty,
    #[error("device id is {0} characters long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("device id contains {0:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")]
    BadChar(char),
    /// `.` or `..`: a URL dot-segment, which `/api/v1/devices/{id}` could never address.
    #[error("device id must not be '.' or '..': a URL resolves those away as dot-segments")]
    DotSegment,
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, InvalidDeviceId> {
        if s.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        let len = s.chars().count();
        if len > MAX_LEN {
            return Err(InvalidDeviceId::TooLong(len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidDeviceId::BadChar(c));
        }
        if s == "." || s == ".." {
            return Err(InvalidDeviceId::DotSegment);
        }
        Ok(DeviceId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceId::parse(s)
    }
}

/// The schema of a device id in the HTTP API's description: a string of the alphabet above.
/// The pattern cannot also say "not `.` or `..`"; the description does.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for DeviceId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some("^[A-Za-z0-9._-]{1,64}$"))
            .min_length(Some(1))
            .max_length(Some(MAX_LEN))
            .description(Some(
                "A device id: 1 to 64 characters of A-Z a-z 0-9 . _ -, not \".\" or \"..\".",
            ))
            .examples(["sensor-01"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for DeviceId {}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "sensor-01",
            "A.b_c-9",
            "...",
            ".a",
            "a..",
            &"x".repeat(64),
        ] {
            assert_eq!(DeviceId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(DeviceId::parse(""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(InvalidDeviceId::TooLong(65))
        );
        for (bad, c) in [
            ("a/b", '/'),
            ("a+", '+'),
            ("#", '#'),
            ("a b", ' '),
            ("é", 'é'),
        ] {
            assert_eq!(DeviceId::parse(bad), Err(InvalidDeviceId::BadChar(c)));
        }
    }

    #[test]
    fn refuses_dot_segments() {
        for bad in [".", ".."] {
            let err = DeviceId::parse(bad).unwrap_err();
            assert_eq!(err, InvalidDeviceId::DotSegment);
            assert!(err.to_string().contains("dot-segment"), "{err}");
            assert!(bad.parse::<DeviceId>().is_err());
        }
    }
}
