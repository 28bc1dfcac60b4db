//! API tokens and their roles: who may do what through the HTTP API.
//!
//! A [`Role`] is one of three, each allowed everything the ones below it are: a `viewer`
//! reads, an `operator` also acts on devices (commands, desired state) and on alerts and
//! rules (acknowledge, enable, disable), an `admin` also changes the fleet itself (devices,
//! certificates, CAs, rules, tokens).
//!
//! The registry keeps an [`ApiToken`] per token: its id, a name, its role, and the SHA-256
//! of its secret, never the secret itself. The token a client presents is
//! `<id>.<secret>` ([`ApiToken::split`]); the one in the data directory's `admin.token` is
//! not in the registry and has no `.`.

use serde::{Deserialize, Serialize};

use crate::TimestampMs;

/// What a token may do; each role may do everything the roles before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: devices, telemetry, commands, state, alerts, rules, stats.
    Viewer,
    /// Also sends commands and desired state, acknowledges alerts, enables and disables
    /// rules.
    Operator,
    /// Also registers, changes and removes devices, certificates, CAs, rules and tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Public: it names the token in lists and in the token itself.
    pub id: String,
    /// What the operator called it ("grafana", "night shift").
    pub name: String,
    pub role: Role,
    /// The SHA-256 of the secret, in lowercase hex.
    pub secret_sha256: String,
    pub created_at_ms: TimestampMs,
}

/// The longest token name, in characters.
pub const MAX_TOKEN_NAME: usize = 100;

impl ApiToken {
    /// The id and secret of a presented `<id>.<secret>`, or `None` for a token of any other
    /// shape (the admin token among them).
    pub fn split(presented: &str) -> Option<(&str, &str)> {
        let (id, secret) = presented.split_once('.')?;
        (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
    }

    /// Checks an operator-given name: 1 to [`MAX_TOKEN_NAME`] characters, none of them
    /// control characters.
    pub fn check_name(name: &str) -> Result<(), String> {
        let chars = name.chars().count();
        if chars == 0 || chars > MAX_TOKEN_NAME {
            return Err(format!(
                "a token name has 1 to {MAX_TOKEN_NAME} characters, not {chars}"
            ));
        }
        if name.chars().any(char::is_control) {
            return Err("a token name may not contain control characters".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_spelled_in_lowercase() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            assert_eq!(
                serde_json::to_value(role).unwrap(),
                serde_json::json!(role.as_str())
            );
        }
        assert_eq!(Role::parse("Admin"), None);
    }

    #[test]
    fn splits_only_id_dot_secret() {
        assert_eq!(ApiToken::split("ab12.s3cret"), Some(("ab12", "s3cret")));
        assert_eq!(ApiToken::split("ab12.s3.cret"), Some(("ab12", "s3.cret")));
        assert_eq!(ApiToken::split("0123abcd"), None);
        assert_eq!(ApiToken::split(".s3cret"), None);
        assert_eq!(ApiToken::split("ab12."), None);
    }

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(ApiToken::check_name("grafana").is_ok());
        assert!(ApiToken::check_name("").is_err());
        assert!(ApiToken::check_name(&"x".repeat(MAX_TOKEN_NAME + 1)).is_err());
        assert!(ApiToken::check_name("a\nb").is_err());
    }
}
