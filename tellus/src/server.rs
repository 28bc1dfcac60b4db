//! One Tellus server process: [`run`] opens the data directory, starts every part, tells
//! its caller where it listens ([`Started`]), and stops them in order when `shutdown`
//! resolves.
//!
//! Start-up: data directory → PKI (CA, server certificate) and admin token → registry and
//! telemetry store → routing core → ingest → gate and HTTP listeners.
//!
//! Shut-down: readiness (`GET /readyz`) turns to 503 at once; the gate stops accepting and every connection stops reading, writes the
//! acknowledgements of what ingest commits, and closes; once the last connection is gone the
//! hand-off channel closes and ingest commits what it still holds; then the HTTP API stops.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context;
use rand::RngCore;
use tellus_api::AppState;
use tellus_broker::{
    devices::Devices,
    gate::{
        self,
        audit::AuditLog,
        sessions::Sessions,
        trust::{ServerIdentity, Trust},
        Gate,
    },
    pki::{write_atomic, Pki},
    routing::{self, Publisher, RoutingConfig},
};
use tellus_core::{IngestSender, Registry, RuleFeed};
use tellus_ingest::{Ingest, QuestDbStore, SqliteRegistry, SqliteStore, TelemetryStore};
use tellus_rules::service::{Outlets, RulesConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Backend, Config};

/// Audit entries that may wait for the registry; past this they are shed and counted.
const AUDIT_QUEUE: usize = 10_000;

/// The files of a data directory.
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    /// The data directory `config` names.
    pub fn of(config: &Config) -> DataDir {
        DataDir {
            root: config.data_dir.clone(),
        }
    }

    /// The data directory `config` names, if it has a registry already: so that the CLI does
    /// not answer a mistyped `--data-dir` from a fresh, empty one.
    pub fn existing(config: &Config) -> anyhow::Result<DataDir> {
        let dir = DataDir::of(config);
        if !dir.registry().exists() {
            anyhow::bail!(
                "{} has no registry (registry.db): is --data-dir right?",
                dir.root.display()
            );
        }
        Ok(dir)
    }

    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn registry(&self) -> PathBuf {
        self.root.join("registry.db")
    }
    pub fn telemetry(&self) -> PathBuf {
        self.root.join("telemetry.db")
    }
    pub fn questdb_spool(&self) -> PathBuf {
        self.root.join("questdb-spool.db")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
}

/// What the CLI and the server both open from a data directory.
pub struct Fleet {
    pub pki: Arc<Pki>,
    pub registry: Arc<dyn Registry>,
}

impl Fleet {
    pub fn open(dir: &DataDir, config: &Config) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&dir.root)
            .with_context(|| format!("creating data directory {}", dir.root.display()))?;
        let pki = Pki::load_or_create(&dir.pki(), config.pki.device_cert_validity)
            .context("opening the fleet CA")?;
        let registry = SqliteRegistry::open(&dir.registry())
            .with_context(|| format!("opening {}", dir.registry().display()))?;
        Ok(Fleet {
            pki: Arc::new(pki),
            registry: Arc::new(registry),
        })
    }
}

/// Reads the admin token, creating it (mode 0600) on first start. Returns the token and
/// whether it was just created.
fn admin_token(path: &Path) -> anyhow::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((token, true))
}

/// Open files a device connection takes: its socket, and both ends of its link into the
/// routing core (which runs in this process).
const FILES_PER_CONNECTION: u64 = 3;
/// Open files besides connections: databases and their journals, listeners, the HTTP API's
/// clients, the runtime's own.
const FILES_BESIDES: u64 = 1024;

/// Raises the soft limit of open files to the hard limit (a process starts with a soft limit
/// of 1,024 on most systems, a few hundred connections' worth), and warns when even the hard
/// limit is below what `max_connections` need: past it, accepting fails and devices wait.
fn raise_open_files(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = max_connections as u64 * FILES_PER_CONNECTION + FILES_BESIDES;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if soft < need {
        warn!(
            open_files = soft,
            needed = need,
            max_connections,
            "the open-file limit is below what mqtt.max_connections needs \
             (3 per connection); raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

/// Where a running Tellus listens, and its admin token: what [`run`] tells its caller once
/// both listeners are bound (with port 0, the ports the system chose).
#[derive(Debug, Clone)]
pub struct Started {
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_token: String,
}

/// Runs Tellus until `shutdown` resolves, then stops it gracefully. `on_started` is called
/// once, when the gate and the HTTP API are serving.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_started: impl FnOnce(Started),
) -> anyhow::Result<()> {
    raise_open_files(config.mqtt.max_connections);
    let dir = DataDir::of(&config);
    let fleet = Fleet::open(&dir, &config)?;
    let (token, created) = admin_token(&dir.admin_token())?;
    if created {
        // Printed once, on the start that creates it; later it is only in the file.
        println!(
            "Admin API token (also in {}): {token}",
            dir.admin_token().display()
        );
    }
    let (chain, key) = fleet
        .pki
        .server_identity(&dir.pki(), &config.pki.server_names)
        .context("preparing the server certificate")?;
    let server_identity = ServerIdentity { chain, key };
    let cas = fleet.registry.cas().context("reading the trusted CAs")?;
    let trust = Trust::build(&fleet.pki, &server_identity, &cas)
        .context("building the TLS configuration")?;

    let store: Arc<dyn TelemetryStore> = match config.store.backend {
        Backend::Embedded => Arc::new(
            SqliteStore::open_with(
                &dir.telemetry(),
                config.store().map_err(anyhow::Error::msg)?,
            )
            .with_context(|| format!("opening {}", dir.telemetry().display()))?,
        ),
        Backend::Questdb => {
            let questdb = config.questdb();
            info!(table = %questdb.table, "telemetry goes to QuestDB");
            Arc::new(
                QuestDbStore::open(&dir.questdb_spool(), questdb)
                    .with_context(|| format!("opening {}", dir.questdb_spool().display()))?,
            )
        }
    };
    let routing = routing::start(&RoutingConfig {
        max_connections: config.mqtt.max_connections + 16,
        max_packet_size: config.mqtt.max_packet_size,
    })
    .context("starting the routing core")?;
    let (ingest_tx, ingest_rx) =
        IngestSender::channel(config.ingest.queue_capacity, config.ingest.queue_bytes);
    // What happens to devices as it happens, for the API's event stream.
    let live = tellus_core::Live::default();
    // What rules are given: committed readings, state, presence and events.
    let (rule_feed, rule_inputs) = RuleFeed::channel(
        tellus_core::rule::RULE_FEED_QUEUE,
        tellus_core::rule::RULE_FEED_BYTES,
    );
    let ingest = Ingest::spawn(
        ingest_rx,
        store.clone(),
        config.ingest(),
        live.clone(),
        rule_feed.clone(),
    )
    .context("starting ingest")?;

    let mqtt = bind(config.mqtt.listen, "mqtt").await?;
    let http = bind(config.http.listen, "http").await?;

    let stop = CancellationToken::new();
    // Tellus's own link into the routing core stops last, after every session.
    let publisher_stop = CancellationToken::new();
    let publisher = Publisher::start(
        &routing,
        config.mqtt.max_packet_size,
        publisher_stop.clone(),
    );
    let gate_stats = Arc::new(gate::GateStats::default());
    let (audit, audit_writer) =
        AuditLog::spawn(fleet.registry.clone(), AUDIT_QUEUE, gate_stats.clone())
            .context("starting the audit writer")?;
    // Connections on record as open are those of the run before, which ended with it.
    let closed = fleet
        .registry
        .close_open_sessions(tellus_core::now_ms(), "Tellus stopped")
        .context("closing the previous run's connections")?;
    if closed > 0 {
        info!(
            connections = closed,
            "connections of the previous run recorded as ended"
        );
    }
    let (devices, device_events, device_events_rx) = Devices::new(
        fleet.registry.clone(),
        publisher.clone(),
        config.mqtt.max_packet_size,
        live.clone(),
        rule_feed.clone(),
    );
    // The device service stops with the publisher, after every session.
    let devices_task = tokio::spawn(
        devices
            .clone()
            .run(device_events_rx, publisher_stop.clone()),
    );
    let metrics = tellus_api::routes::metrics::Sources {
        ingest_queue: ingest_tx.gauge(),
        rule_feed: rule_feed.gauge(),
        audit_queue: audit.gauge(),
        publisher_queue: publisher.gauge(),
        published: publisher.stats(),
    };
    let gate = Gate {
        trust: RwLock::new(Arc::new(trust)),
        server_identity,
        registry: fleet.registry.clone(),
        ingest: ingest_tx,
        routing,
        config: config.gate(),
        stats: gate_stats.clone(),
        sessions: Arc::new(Sessions::default()),
        audit,
        pki: fleet.pki.clone(),
        publisher: publisher.clone(),
        device_events,
        rules: rule_feed.clone(),
    };
    // The rules engine stops after the gate, ingest and the device service, once it has
    // evaluated what they handed it.
    let rules_stop = CancellationToken::new();
    let (rules, rules_running) = tellus_rules::service::start(
        RulesConfig::default(),
        Outlets {
            registry: fleet.registry.clone(),
            devices: devices.clone(),
            publisher,
            store: store.clone(),
            live: live.clone(),
        },
        rule_feed,
        rule_inputs,
        rules_stop.clone(),
    )
    .context("starting the rules engine")?;
    let (mqtt_addr, http_addr) = (mqtt.local_addr()?, http.local_addr()?);
    let gate_task = tokio::spawn(gate::run(mqtt, gate, stop.clone()));
    let health = tellus_api::routes::health::Health::default();
    let state = AppState {
        registry: fleet.registry.clone(),
        store,
        pki: fleet.pki.clone(),
        ingest_stats: ingest.stats(),
        gate_stats,
        devices,
        live,
        rules,
        admin_token: Arc::from(token.as_str()),
        health: health.clone(),
        metrics,
    };
    // The API outlives the gate and ingest, so operators can query until the end.
    let api_stop = CancellationToken::new();
    let api_task = tokio::spawn(tellus_api::serve(
        http,
        state,
        api_stop.clone().cancelled_owned(),
    ));

    on_started(Started {
        mqtt_addr,
        http_addr,
        admin_token: token,
    });

    shutdown.await;
    info!("shutting down");
    // Load balancers see the node unready while it drains.
    health.stopping();
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    stop.cancel();
    let drained = tokio::time::timeout_at(deadline, async {
        let _ = gate_task.await;
        ingest.finished().await;
        audit_writer.finished().await;
    })
    .await;
    api_stop.cancel();
    publisher_stop.cancel();
    if tokio::time::timeout_at(deadline, devices_task)
        .await
        .is_err()
    {
        warn!("the device service did not stop in time");
    }
    rules_stop.cancel();
    if tokio::time::timeout_at(deadline, rules_running.finished())
        .await
        .is_err()
    {
        warn!("the rules engine did not stop in time");
    }
    if drained.is_err() {
        warn!(timeout = ?config.shutdown_timeout, "shutdown timed out; unacknowledged messages were not committed");
        anyhow::bail!("shutdown timed out after {:?}", config.shutdown_timeout);
    }
    match tokio::time::timeout_at(deadline, api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "HTTP API stopped with an error"),
        _ => warn!("HTTP API did not stop in time"),
    }
    info!("stopped");
    Ok(())
}

async fn bind(addr: SocketAddr, name: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} listener to {addr}"))?;
    let bound = listener.local_addr()?;
    info!(listener = name, addr = %bound, "listening");
    Ok(listener)
}
