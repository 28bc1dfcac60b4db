//! `tellus`: parses the command line, sets up logging, and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tellus::{
    config::{Config, LogFormat, DEFAULT_TOML},
    demo, devices, server, tokens,
};
use tellus_core::DeviceStatus;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tellus",
    version,
    about = "A backend for fleets of IoT devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that open a data directory.
#[derive(clap::Args)]
struct Common {
    /// A TOML configuration file (see `tellus config`).
    #[arg(long, env = "TELLUS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./tellus-data].
    #[arg(long, env = "TELLUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker, ingest and HTTP API.
    Serve {
        #[command(flatten)]
        common: Common,
        /// MQTT over TLS listen address [default: 0.0.0.0:8883].
        #[arg(long, env = "TELLUS_MQTT_ADDR")]
        mqtt_addr: Option<std::net::SocketAddr>,
        /// HTTP API listen address [default: 127.0.0.1:8080].
        #[arg(long, env = "TELLUS_HTTP_ADDR")]
        http_addr: Option<std::net::SocketAddr>,
    },
    /// Run Tellus with a simulated fleet, in a temporary data directory: the quickest way
    /// to look at it. Ctrl-C stops the devices, then Tellus.
    Demo {
        /// MQTT over TLS listen address [default: 0.0.0.0:8883]; port 0 takes a free port
        /// (the one taken is printed).
        #[arg(long)]
        mqtt_addr: Option<std::net::SocketAddr>,
        /// HTTP API listen address [default: 127.0.0.1:8080]; port 0 as above.
        #[arg(long)]
        http_addr: Option<std::net::SocketAddr>,
        /// How many simulated devices.
        #[arg(long, default_value_t = 12)]
        devices: usize,
        /// Keep the data directory when the demo stops (it is deleted otherwise).
        #[arg(long)]
        keep: bool,
    },
    /// Print the default configuration, with comments.
    Config,
    /// Manage devices directly in the data directory (a running server sees the change
    /// within a second).
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Manage API tokens directly in the data directory (a running server sees the change
    /// at the next request).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token with a role, and print it (only this once).
    Create {
        /// What it is for, for people ("grafana", "night shift").
        #[arg(long)]
        name: String,
        /// viewer (reads), operator (also sends commands, acknowledges alerts, enables and
        /// disables rules) or admin (everything).
        #[arg(long)]
        role: String,
        #[command(flatten)]
        common: Common,
    },
    /// List the tokens: id, role, name (never a secret).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a token by its id; it is refused from the next request on.
    Revoke {
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device and write its certificate, key and the CA certificate.
    Create {
        /// The device id: 1 to 64 characters of A-Z a-z 0-9 . _ -
        id: String,
        /// Where to write <id>.crt, <id>.key and ca.crt.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke one certificate of a device, or all of them; its connection is closed.
    Revoke {
        id: String,
        /// The certificate's serial number in hex, any case, colons allowed (as `openssl x509
        /// -serial` prints it) [default: every certificate of the device].
        #[arg(long)]
        serial: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Refuse a device at the gate (closing its connection) until it is enabled again.
    Disable {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Admit a disabled device again.
    Enable {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a device; its certificates stay revoked on the CRL.
    Delete {
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

impl Common {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        Ok(config)
    }
}

fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Config => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Serve {
            common,
            mqtt_addr,
            http_addr,
        } => {
            let mut config = common.load()?;
            if let Some(a) = mqtt_addr {
                config.mqtt.listen = a;
            }
            if let Some(a) = http_addr {
                config.http.listen = a;
            }
            init_logging(&config);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let result = runtime.block_on(server::run(config, shutdown_signal(), |_| {}));
            // After a stop that timed out, a commit may still be running on a blocking
            // thread; the process ends anyway rather than wait for it without limit (what it
            // had not committed, it had not acknowledged).
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Demo {
            mqtt_addr,
            http_addr,
            devices,
            keep,
        } => {
            let mut config = Config::default();
            if let Some(a) = mqtt_addr {
                config.mqtt.listen = a;
            }
            if let Some(a) = http_addr {
                config.http.listen = a;
            }
            init_logging(&config);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let options = demo::DemoOptions { devices, keep };
            let result = runtime.block_on(demo::run(config, options, shutdown_signal()));
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Device { command } => {
            let line = match command {
                DeviceCommand::Create { id, out, common } => {
                    devices::create(&common.load()?, &id, &out)?
                }
                DeviceCommand::Revoke { id, serial, common } => {
                    devices::revoke(&common.load()?, &id, serial.as_deref())?
                }
                DeviceCommand::Disable { id, common } => {
                    devices::set_status(&common.load()?, &id, DeviceStatus::Disabled)?
                }
                DeviceCommand::Enable { id, common } => {
                    devices::set_status(&common.load()?, &id, DeviceStatus::Enabled)?
                }
                DeviceCommand::Delete { id, common } => devices::delete(&common.load()?, &id)?,
            };
            println!("{line}");
            Ok(())
        }
        Command::Token { command } => {
            let line = match command {
                TokenCommand::Create { name, role, common } => {
                    tokens::create(&common.load()?, &name, &role)?
                }
                TokenCommand::List { common } => tokens::list(&common.load()?)?,
                TokenCommand::Revoke { id, common } => tokens::revoke(&common.load()?, &id)?,
            };
            println!("{line}");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
