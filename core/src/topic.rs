//! The topic grammar (ARCHITECTURE.md, "Topics") and the per-device ACL.
//!
//! Every topic lives under `devices/{id}/`. A device may publish and subscribe only in its
//! own tree, and only in the direction the topic table gives:
//!
//! | topic | device may |
//! |---|---|
//! | `devices/{id}/telemetry`, `…/telemetry/pb` | publish |
//! | `devices/{id}/state/reported` | publish |
//! | `devices/{id}/state/desired` | subscribe |
//! | `devices/{id}/commands/{command_id}` | subscribe (`+` allowed for the command id) |
//! | `devices/{id}/commands/{command_id}/result` | publish |
//! | `devices/{id}/events/{name}` | publish |
//! | `devices/{id}/certs/csr` | publish (a CSR, to rotate its certificate) |
//! | `devices/{id}/certs/issued` | subscribe (the certificate issued from that CSR) |
//!
//! The gate calls [`check_publish`] for every PUBLISH and will, and [`check_subscribe`] for
//! every SUBSCRIBE filter; anything else is refused with an [`AclDenied`] that says why.

use crate::DeviceId;

/// The first topic level of every Tellus topic.
pub const ROOT: &str = "devices";

/// A topic in a device's tree, as the topic table names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    /// `telemetry`: JSON telemetry.
    Telemetry,
    /// `telemetry/pb`: protobuf `TelemetryBatch`.
    TelemetryPb,
    /// `state/reported`
    StateReported,
    /// `state/desired`
    StateDesired,
    /// `commands/{command_id}`
    Command(String),
    /// `commands/{command_id}/result`
    CommandResult(String),
    /// `events/{name}`
    Event(String),
    /// `certs/csr`: a certificate signing request from the device, to rotate its identity.
    CertsCsr,
    /// `certs/issued`: the answer to the device's CSR.
    CertsIssued,
}

impl DeviceTopic {
    /// Whether a publish on this topic is telemetry that ingest stores (and the gate
    /// acknowledges only once durable).
    pub fn is_telemetry(&self) -> bool {
        matches!(self, DeviceTopic::Telemetry | DeviceTopic::TelemetryPb)
    }

    /// Whether a device may publish on this topic of its own tree.
    pub fn device_may_publish(&self) -> bool {
        !matches!(
            self,
            DeviceTopic::StateDesired | DeviceTopic::Command(_) | DeviceTopic::CertsIssued
        )
    }

    /// The full topic string in `device`'s tree.
    pub fn topic(&self, device: &DeviceId) -> String {
        let rest = match self {
            DeviceTopic::Telemetry => "telemetry".to_owned(),
            DeviceTopic::TelemetryPb => "telemetry/pb".to_owned(),
            DeviceTopic::StateReported => "state/reported".to_owned(),
            DeviceTopic::StateDesired => "state/desired".to_owned(),
            DeviceTopic::Command(c) => format!("commands/{c}"),
            DeviceTopic::CommandResult(c) => format!("commands/{c}/result"),
            DeviceTopic::Event(n) => format!("events/{n}"),
            DeviceTopic::CertsCsr => "certs/csr".to_owned(),
            DeviceTopic::CertsIssued => "certs/issued".to_owned(),
        };
        format!("{ROOT}/{device}/{rest}")
    }

    /// Parses the part of a topic after `devices/{id}/`.
    fn parse_rest(levels: &[&str]) -> Option<DeviceTopic> {
        let name = |s: &str| is_plain_level(s).then(|| s.to_owned());
        Some(match levels {
            ["telemetry"] => DeviceTopic::Telemetry,
            ["telemetry", "pb"] => DeviceTopic::TelemetryPb,
            ["state", "reported"] => DeviceTopic::StateReported,
            ["state", "desired"] => DeviceTopic::StateDesired,
            ["commands", c] => DeviceTopic::Command(name(c)?),
            ["commands", c, "result"] => DeviceTopic::CommandResult(name(c)?),
            ["events", n] => DeviceTopic::Event(name(n)?),
            ["certs", "csr"] => DeviceTopic::CertsCsr,
            ["certs", "issued"] => DeviceTopic::CertsIssued,
            _ => return None,
        })
    }
}

/// Why the ACL refused a topic or filter; the text is logged with the device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclDenied {
    #[error("topic {0:?} is outside the device's own tree devices/{1}/")]
    OtherTree(String, DeviceId),
    #[error("topic {0:?} is not in the topic table")]
    Unknown(String),
    #[error("devices may not publish on {0:?}")]
    NotPublishable(String),
    #[error("devices may not subscribe to {0:?}")]
    NotSubscribable(String),
}

/// Longest part of a refused topic quoted in an [`AclDenied`]; a device chooses the topic,
/// so the text that ends up in logs and the audit trail must be bounded.
const QUOTED: usize = 128;

/// `topic` as quoted in an [`AclDenied`]: at most [`QUOTED`] characters.
fn quoted(topic: &str) -> String {
    match topic.char_indices().nth(QUOTED) {
        None => topic.to_owned(),
        Some((end, _)) => format!("{}…", &topic[..end]),
    }
}

/// A level that names something (a command id, an event name): not empty, no wildcard.
fn is_plain_level(s: &str) -> bool {
    !s.is_empty() && !s.contains(['+', '#', '\0'])
}

/// Splits `devices/{id}/rest…` into the id level and the rest, if `topic` has that shape.
fn split_device(topic: &str) -> Option<(&str, Vec<&str>)> {
    let mut levels = topic.split('/');
    if levels.next()? != ROOT {
        return None;
    }
    let id = levels.next()?;
    Some((id, levels.collect()))
}

/// Parses a concrete topic (no wildcards) into the device it belongs to and its kind.
pub fn parse(topic: &str) -> Option<(DeviceId, DeviceTopic)> {
    let (id, rest) = split_device(topic)?;
    let id = DeviceId::parse(id).ok()?;
    Some((id, DeviceTopic::parse_rest(&rest)?))
}

/// May `device` publish on `topic`? Returns the topic's kind when it may.
pub fn check_publish(device: &DeviceId, topic: &str) -> Result<DeviceTopic, AclDenied> {
    let denied_tree = || AclDenied::OtherTree(quoted(topic), device.clone());
    let (id, rest) = split_device(topic).ok_or_else(denied_tree)?;
    if id != device.as_str() {
        return Err(denied_tree());
    }
    let kind = DeviceTopic::parse_rest(&rest).ok_or_else(|| AclDenied::Unknown(quoted(topic)))?;
    if !kind.device_may_publish() {
        return Err(AclDenied::NotPublishable(quoted(topic)));
    }
    Ok(kind)
}

/// May `device` subscribe to `filter`? Only its desired state, its commands and its issued
/// certificates: the command id level may be the single-level wildcard `+`; no other
/// wildcard is accepted.
pub fn check_subscribe(device: &DeviceId, filter: &str) -> Result<(), AclDenied> {
    let denied_tree = || AclDenied::OtherTree(quoted(filter), device.clone());
    let (id, rest) = split_device(filter).ok_or_else(denied_tree)?;
    if id != device.as_str() {
        return Err(denied_tree());
    }
    let allowed = match rest.as_slice() {
        ["state", "desired"] | ["certs", "issued"] => true,
        ["commands", c] => *c == "+" || is_plain_level(c),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(AclDenied::NotSubscribable(quoted(filter)))
    }
}

/// The tag that makes a device an operator client: `tellus.role` = `operator`.
pub const ROLE_TAG: &str = "tellus.role";
pub const OPERATOR_ROLE: &str = "operator";
/// The first level of the topics rules publish on (their `publish` action).
pub const RULES_ROOT: &str = "rules";

/// The ACL for a SUBSCRIBE filter of a device that may be an operator client: an operator
/// may also subscribe to what rules publish (`rules/…`, wildcards allowed), and to nothing
/// else beyond its own tree.
pub fn check_subscribe_as(
    device: &DeviceId,
    operator: bool,
    filter: &str,
) -> Result<(), AclDenied> {
    let under_rules = filter
        .strip_prefix(RULES_ROOT)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if operator && under_rules {
        return if is_valid_filter(filter) {
            Ok(())
        } else {
            Err(AclDenied::NotSubscribable(quoted(filter)))
        };
    }
    check_subscribe(device, filter)
}

/// Whether `filter` is a well-formed MQTT topic filter: `+` and `#` each a whole level,
/// `#` only last, no empty filter and no NUL.
fn is_valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && !filter.contains('\0')
        && levels.iter().enumerate().all(|(i, level)| match *level {
            "#" => i == levels.len() - 1,
            "+" => true,
            l => !l.contains(['+', '#']),
        })
}

/// Whether the MQTT topic filter `filter` (with `+` and `#` wildcards) matches `topic`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (l, Some(t)) if l == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {

    #[test]
    fn operators_may_also_subscribe_to_what_rules_publish() {
        let d = DeviceId::parse("ops-1").unwrap();
        for filter in ["rules/#", "rules/alerts/+", "rules"] {
            assert!(check_subscribe_as(&d, true, filter).is_ok(), "{filter}");
            assert!(check_subscribe_as(&d, false, filter).is_err(), "{filter}");
        }
        for filter in [
            "rulesx/#",
            "#",
            "devices/other/commands/+",
            "+/alerts",
            "rules/#/x",
            "rules/a#",
            "rules/a+/b",
        ] {
            assert!(check_subscribe_as(&d, true, filter).is_err(), "{filter}");
        }
        assert!(check_subscribe_as(&d, true, "devices/ops-1/commands/+").is_ok());
    }

    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        let t = "devices/d1/commands/c-1";
        for yes in [
            "devices/d1/commands/+",
            "devices/d1/#",
            "#",
            "devices/+/commands/c-1",
            t,
        ] {
            assert!(filter_matches(yes, t), "{yes}");
        }
        for no in [
            "devices/d1/commands",
            "devices/d1/commands/+/result",
            "devices/d2/#",
            "+",
        ] {
            assert!(!filter_matches(no, t), "{no}");
        }
        assert!(filter_matches(
            "devices/d1/commands/#",
            "devices/d1/commands"
        ));
    }

    #[test]
    fn publish_in_own_tree_as_the_table_says() {
        let d = id("s1");
        assert_eq!(
            check_publish(&d, "devices/s1/telemetry"),
            Ok(DeviceTopic::Telemetry)
        );
        assert_eq!(
            check_publish(&d, "devices/s1/telemetry/pb"),
            Ok(DeviceTopic::TelemetryPb)
        );
        assert_eq!(
            check_publish(&d, "devices/s1/state/reported"),
            Ok(DeviceTopic::StateReported)
        );
        assert_eq!(
            check_publish(&d, "devices/s1/commands/c-1/result"),
            Ok(DeviceTopic::CommandResult("c-1".into()))
        );
        assert_eq!(
            check_publish(&d, "devices/s1/events/boot"),
            Ok(DeviceTopic::Event("boot".into()))
        );
    }

    #[test]
    fn publish_refusals() {
        let d = id("s1");
        assert!(matches!(
            check_publish(&d, "devices/s2/telemetry"),
            Err(AclDenied::OtherTree(..))
        ));
        assert!(matches!(
            check_publish(&d, "other/s1/telemetry"),
            Err(AclDenied::OtherTree(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1"),
            Err(AclDenied::Unknown(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1/telemetry/x"),
            Err(AclDenied::Unknown(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1/events/"),
            Err(AclDenied::Unknown(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1/state/desired"),
            Err(AclDenied::NotPublishable(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1/commands/c1"),
            Err(AclDenied::NotPublishable(..))
        ));
        assert!(matches!(
            check_publish(&d, "devices/s1/certs/issued"),
            Err(AclDenied::NotPublishable(..))
        ));
        assert_eq!(
            check_publish(&d, "devices/s1/certs/csr"),
            Ok(DeviceTopic::CertsCsr)
        );
    }

    #[test]
    fn subscribe_only_to_desired_state_and_commands() {
        let d = id("s1");
        for ok in [
            "devices/s1/state/desired",
            "devices/s1/commands/+",
            "devices/s1/commands/abc",
            "devices/s1/certs/issued",
        ] {
            assert_eq!(check_subscribe(&d, ok), Ok(()), "{ok}");
        }
        for bad in [
            "#",
            "devices/#",
            "devices/+/commands/+",
            "devices/s1/#",
            "devices/s1/commands/#",
            "devices/s1/telemetry",
            "devices/s1/certs/csr",
            "devices/s1/certs/+",
            "devices/s2/commands/+",
            "$SYS/#",
            "$share/g/devices/s1/commands/+",
        ] {
            assert!(check_subscribe(&d, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_quote_a_bounded_part_of_the_topic() {
        let d = id("s1");
        let long = format!("devices/s2/{}", "x".repeat(10_000));
        let why = check_publish(&d, &long).unwrap_err().to_string();
        assert!(why.len() < 300, "{why}");
    }

    #[test]
    fn topics_round_trip() {
        let d = id("s1");
        for t in [
            DeviceTopic::Telemetry,
            DeviceTopic::TelemetryPb,
            DeviceTopic::StateReported,
            DeviceTopic::StateDesired,
            DeviceTopic::Command("c".into()),
            DeviceTopic::CommandResult("c".into()),
            DeviceTopic::Event("e".into()),
            DeviceTopic::CertsCsr,
            DeviceTopic::CertsIssued,
        ] {
            assert_eq!(parse(&t.topic(&d)), Some((d.clone(), t)));
        }
    }
}
