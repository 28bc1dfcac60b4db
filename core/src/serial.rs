//! Certificate serial numbers as the registry writes them: lower-case hex, no separators.
//!
//! Start with [`normalize`]: it turns a serial as people copy it (`openssl x509 -serial`
//! prints upper case, browsers and `openssl x509 -text` put colons between bytes) into that
//! form, so that the HTTP API and the CLI look certificates up the same way.

/// A serial number that is not hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a certificate serial number in hex (colons between bytes allowed), found {0:?}")]
pub struct InvalidSerial(pub String);

/// `serial` in the registry's form: surrounding whitespace trimmed, colons removed, hex digits
/// lower-cased. Refused: nothing left once colons are removed, or anything but hex digits.
pub fn normalize(serial: &str) -> Result<String, InvalidSerial> {
    let hex = serial.trim().replace(':', "").to_ascii_lowercase();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidSerial(serial.to_owned()));
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_become_lower_case_hex_without_colons() {
        assert_eq!(normalize("0A:bC:12").unwrap(), "0abc12");
        assert_eq!(normalize("0abc12").unwrap(), "0abc12");
        assert_eq!(normalize(" FF ").unwrap(), "ff");
        assert_eq!(normalize("00").unwrap(), "00", "leading zeros are kept");
    }

    #[test]
    fn anything_but_hex_is_refused() {
        for bad in ["", " ", ":", "::", "xyz", "0a 0b", "0x0a", "0a-0b", "é"] {
            assert_eq!(
                normalize(bad),
                Err(InvalidSerial(bad.to_owned())),
                "{bad:?}"
            );
        }
        let message = normalize("xyz").unwrap_err().to_string();
        assert!(
            message.contains("in hex") && message.contains("\"xyz\""),
            "{message}"
        );
    }
}
