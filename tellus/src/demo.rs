//! `tellus demo`: Tellus with a simulated fleet, the quickest way to look at it.
//!
//! [`run`] makes a temporary data directory, registers the fleet there (each device with its
//! own certificate, and tags `site` and `model`) and a few rules, starts Tellus on it with
//! [`server::run`], and once Tellus listens runs the devices in this process, each over
//! its own mTLS connection with the device SDK ([`tellus_device::sim`], the simulated
//! device `fleet-sim` runs too): a reading a second, commands answered, state reported; a
//! device or two goes offline now and then. It prints where to look, the admin token and the
//! data directory, then runs until `shutdown` (Ctrl-C): the devices stop first, then Tellus,
//! gracefully; the data directory is deleted unless kept.
//!
//! The rules give the alerts and rules pages something to show: a device over 27 °C for
//! 30 s raises a warning (one device in six runs hot), a battery under 15 % an info (one
//! device starts nearly flat), and a device offline for 10 s a warning that clears when it
//! is back.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context};
use serde_json::json;
use tellus_core::{now_ms, rule::new_rule_id, Rule, RuleSpec};
use tellus_device::{
    sim::{Outages, SimConfig, SimDevice},
    Credentials,
};
use tellus_rules::{engine::Compiled, expr::with_stack};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    server::{self, DataDir, Fleet, Started},
};

/// Most devices the demo simulates.
pub const MAX_DEVICES: usize = 1_000;
/// How often each device takes a reading.
const EVERY: Duration = Duration::from_secs(1);
const SITES: [&str; 3] = ["berlin", "lisbon", "oslo"];
const MODELS: [&str; 2] = ["th-100", "th-200"];

/// What `tellus demo` is asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated devices (1 to [`MAX_DEVICES`]).
    pub devices: usize,
    /// Keep the data directory when the demo stops.
    pub keep: bool,
}

/// A device of the fleet as the demo registers and runs it.
struct Simulated {
    creds: Credentials,
    config: SimConfig,
}

/// Runs the demo on `config` (its listeners; its data directory is replaced by a temporary
/// one) until `shutdown` resolves.
pub async fn run(
    mut config: Config,
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if !(1..=MAX_DEVICES).contains(&options.devices) {
        bail!("--devices must be from 1 to {MAX_DEVICES}");
    }
    let dir = tempfile::Builder::new()
        .prefix("tellus-demo-")
        .tempdir()
        .context("making the demo's data directory")?;
    config.data_dir = dir.path().to_owned();
    // Registering a large fleet takes a while: Ctrl-C meanwhile stops the demo (once what is
    // being written is written) and still deletes the directory, which holds private keys.
    tokio::pin!(shutdown);
    let preparing = {
        let (config, devices) = (config.clone(), options.devices);
        tokio::task::spawn_blocking(move || prepare(&config, devices))
    };
    tokio::pin!(preparing);
    let fleet = tokio::select! {
        prepared = &mut preparing => prepared.context("registering the demo's fleet")??,
        _ = &mut shutdown => {
            let _ = preparing.await;
            finish(dir, options.keep)?;
            return Ok(());
        }
    };

    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let stop = CancellationToken::new();
    let server = server::run(config, stop.clone().cancelled_owned(), move |started| {
        let _ = started_tx.send(started);
    });
    let demo = async {
        let result = drive(started_rx, fleet, dir.path().to_owned(), shutdown).await;
        // The devices have stopped (or never started): Tellus stops now.
        stop.cancel();
        result
    };
    let (served, drove) = tokio::join!(server, demo);
    if let Err(e) = served {
        // Tellus did not stop cleanly (it may still hold the files): the directory stays.
        let path = dir.keep();
        eprintln!("The demo's data directory is kept: {}", path.display());
        return Err(e);
    }
    finish(dir, options.keep)?;
    drove
}

/// Keeps the demo's data directory (saying where), or deletes it.
fn finish(dir: tempfile::TempDir, keep: bool) -> anyhow::Result<()> {
    if keep {
        let path = dir.keep();
        println!("The data directory is kept: {}", path.display());
        return Ok(());
    }
    let path = dir.path().to_owned();
    dir.close()
        .with_context(|| format!("deleting {}", path.display()))?;
    println!("The demo's data directory is deleted.");
    Ok(())
}

/// Registers the fleet (certificates, tags) and the demo's rules in a new data directory.
fn prepare(config: &Config, devices: usize) -> anyhow::Result<Vec<Simulated>> {
    let fleet = Fleet::open(&DataDir::of(config), config)?;
    let width = devices.to_string().len().max(2);
    let mut simulated = Vec::with_capacity(devices);
    for i in 0..devices {
        let id = format!("demo-{:0width$}", i + 1);
        let (site, model) = (SITES[i % SITES.len()], MODELS[i % MODELS.len()]);
        let created =
            tellus_broker::provision::create_device(&fleet.pki, fleet.registry.as_ref(), &id, None)
                .with_context(|| format!("registering {id}"))?;
        let tags: BTreeMap<String, Option<String>> = [
            ("site".to_owned(), Some(site.to_owned())),
            ("model".to_owned(), Some(model.to_owned())),
        ]
        .into();
        fleet
            .registry
            .set_tags(&created.device.id, &tags)
            .with_context(|| format!("tagging {id}"))?;
        let key = created
            .cert
            .key_pem
            .context("Tellus made the device's key, so it has it")?;
        let creds = Credentials {
            id: created.device.id.clone(),
            cert_pem: created.cert.cert_pem,
            key_pem: key,
            ca_pem: fleet.pki.ca_pem().to_owned(),
        };
        let mut config = SimConfig::new(EVERY);
        // One device in six runs hot: over the alert's threshold for much of the day.
        if i % 6 == 0 {
            config.temperature_mean = 28.5;
        }
        // One starts with its battery nearly flat.
        if i == 2 {
            config.battery = 14.0;
        }
        // One in six drops off now and then.
        if i % 6 == 5 {
            config.outages = Some(Outages {
                every: Duration::from_secs(180),
                lasting: (Duration::from_secs(20), Duration::from_secs(60)),
            });
        }
        config.state = json!({"model": model, "site": site, "firmware": "2.3.1"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        simulated.push(Simulated { creds, config });
    }
    for spec in rules() {
        let now = now_ms();
        let rule = Rule {
            id: new_rule_id(),
            spec,
            enabled: true,
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let checked = rule.clone();
        with_stack(move || Compiled::new(&checked, Default::default()).map(|_| ()))
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("the demo rule {:?}", rule.spec.name))?;
        fleet
            .registry
            .insert_rule(&rule)
            .with_context(|| format!("storing the demo rule {:?}", rule.spec.name))?;
    }
    Ok(simulated)
}

/// The demo's rules, as an operator would write them for `POST /api/v1/rules`.
fn rules() -> Vec<RuleSpec> {
    [
        json!({
            "name": "too hot",
            "description": "A reading over 27 °C for 30 s.",
            "trigger": "telemetry",
            "condition": "metrics.temperature > 27.0",
            "for": "30s",
            "actions": [{"type": "alert", "severity": "warning",
                         "message": "temperature over 27 °C"}]
        }),
        json!({
            "name": "battery low",
            "trigger": "telemetry",
            "condition": "metrics.battery < 15.0",
            "actions": [{"type": "alert", "severity": "info", "message": "battery under 15 %"}]
        }),
        json!({
            "name": "offline",
            "description": "A device gone for 10 s; cleared when it is back.",
            "trigger": "presence",
            "condition": "!online",
            "for": "10s",
            "actions": [{"type": "alert", "severity": "warning", "message": "device offline"}]
        }),
    ]
    .into_iter()
    .filter_map(|spec| serde_json::from_value(spec).ok())
    .collect()
}

/// Once Tellus listens, runs the fleet until `shutdown`, then stops it.
async fn drive(
    started: tokio::sync::oneshot::Receiver<Started>,
    fleet: Vec<Simulated>,
    data_dir: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let started = tokio::select! {
        started = started => started.context("Tellus stopped before it listened")?,
        _ = &mut shutdown => return Ok(()),
    };
    let host = reachable(started.mqtt_addr.ip()).to_string();
    let count = fleet.len();
    let mut devices = Vec::with_capacity(count);
    for device in fleet {
        match SimDevice::start(
            device.creds,
            host.clone(),
            started.mqtt_addr.port(),
            device.config,
        ) {
            Ok(sim) => devices.push(sim),
            Err(e) => {
                stop_all(devices).await;
                return Err(e).context("starting a simulated device");
            }
        }
    }
    let http = SocketAddr::new(reachable(started.http_addr.ip()), started.http_addr.port());
    let mqtt = SocketAddr::new(reachable(started.mqtt_addr.ip()), started.mqtt_addr.port());
    println!();
    println!("Tellus demo: {count} simulated devices, a reading a second each.");
    println!("  dashboard:  http://{http}/");
    println!("  API:        http://{http}/api/v1 (Authorization: Bearer <token>)");
    println!("  metrics:    http://{http}/metrics");
    println!("  MQTT:       {mqtt} (mTLS)");
    println!("  token:      {}", started.admin_token);
    println!("  data:       {}", data_dir.display());
    println!("Stop with Ctrl-C (the devices stop first, then Tellus).");
    println!();
    shutdown.await;
    println!("Stopping the simulated devices, then Tellus.");
    stop_all(devices).await;
    Ok(())
}

/// Stops every simulated device, all at once.
async fn stop_all(devices: Vec<SimDevice>) {
    futures::future::join_all(devices.into_iter().map(SimDevice::stop)).await;
}

/// An address a local client can reach a listener bound to `ip` at: loopback for the
/// unspecified address.
fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_rules_are_valid_rules() {
        let rules = rules();
        assert_eq!(rules.len(), 3);
        for spec in rules {
            let rule = Rule {
                id: new_rule_id(),
                spec,
                enabled: true,
                version: 1,
                created_at_ms: 0,
                updated_at_ms: 0,
            };
            with_stack(move || Compiled::new(&rule, Default::default()).map(|_| ())).unwrap();
        }
    }

    #[test]
    fn listeners_on_every_address_are_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            reachable("::".parse().unwrap()),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            reachable("10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
