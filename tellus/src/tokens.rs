//! `tellus token …`: make, list and revoke API tokens directly in a data directory, without
//! the HTTP API (for the first token of a deployment, or a script on the server).
//!
//! A running `tellus serve` on the same data directory looks tokens up in the registry on
//! every request, so a token made here works at once and one revoked here is refused from
//! the next request on. Like the API, nothing here prints a secret but `create`, once.

use anyhow::{bail, Context};
use tellus_api::auth::mint;
use tellus_core::{now_ms, Registry, Role};
use tellus_ingest::SqliteRegistry;

use crate::{config::Config, server::DataDir};

/// Makes a token; the line printed holds it.
pub fn create(config: &Config, name: &str, role: &str) -> anyhow::Result<String> {
    let role = Role::parse(role)
        .with_context(|| format!("role {role:?}: one of viewer, operator, admin"))?;
    let dir = DataDir::of(config);
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("creating data directory {}", dir.root.display()))?;
    let registry = open(&dir)?;
    let (record, token) = mint(name.to_owned(), role, now_ms()).map_err(anyhow::Error::msg)?;
    registry.insert_api_token(&record)?;
    Ok(format!(
        "Token {} ({role}) made; it is shown only now:\n{token}",
        record.id
    ))
}

/// One line per token: id, role, name.
pub fn list(config: &Config) -> anyhow::Result<String> {
    let registry = open_existing(config)?;
    let mut lines = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = registry.api_tokens(after.as_deref(), 1_000)?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        lines.extend(
            page.iter()
                .map(|t| format!("{}\t{}\t{}", t.id, t.role, t.name)),
        );
    }
    if lines.is_empty() {
        return Ok("no tokens (the admin token is in admin.token)".into());
    }
    Ok(lines.join("\n"))
}

/// Revokes a token.
pub fn revoke(config: &Config, id: &str) -> anyhow::Result<String> {
    let registry = open_existing(config)?;
    if !registry.delete_api_token(id)? {
        bail!("no token {id} in {}", config.data_dir.display());
    }
    Ok(format!("Token {id} revoked"))
}

fn open(dir: &DataDir) -> anyhow::Result<SqliteRegistry> {
    SqliteRegistry::open(&dir.registry())
        .with_context(|| format!("opening {}", dir.registry().display()))
}

/// The registry of a data directory that has one.
fn open_existing(config: &Config) -> anyhow::Result<SqliteRegistry> {
    open(&DataDir::existing(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        assert!(list(&config).is_err(), "no registry yet");
        let made = create(&config, "ci", "operator").unwrap();
        let token = made.lines().last().unwrap();
        let (id, _) = tellus_core::ApiToken::split(token).unwrap();
        assert!(create(&config, "ci", "root").is_err());
        let listed = list(&config).unwrap();
        assert_eq!(listed, format!("{id}\toperator\tci"));
        assert_eq!(revoke(&config, id).unwrap(), format!("Token {id} revoked"));
        assert!(revoke(&config, id).is_err());
        assert!(list(&config).unwrap().starts_with("no tokens"));
    }
}
