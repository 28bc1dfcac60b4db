//! What the example device programs share: how they are told who they are and where Tellus
//! is, and their logging.

use std::path::PathBuf;

use tellus_device::{Credentials, Device, DeviceBuilder, OutboxConfig};

/// The command-line arguments of a device program.
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// Folder with <id>.crt, <id>.key and ca.crt.
    #[arg(long)]
    pub certs: PathBuf,
    /// The device id (the certificate's CN).
    #[arg(long)]
    pub id: String,
    #[arg(long, default_value = "localhost")]
    pub host: String,
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// The outbox file [default: <id>-outbox.db].
    #[arg(long)]
    pub outbox: Option<PathBuf>,
}

impl DeviceArgs {
    /// A device builder with these credentials, this Tellus and this outbox file.
    pub fn builder(&self) -> anyhow::Result<DeviceBuilder> {
        let creds = Credentials::from_dir(&self.certs, &self.id)?;
        let outbox = self
            .outbox
            .clone()
            .unwrap_or_else(|| format!("{}-outbox.db", self.id).into());
        Ok(Device::builder(creds, self.host.clone(), self.port).outbox(OutboxConfig::file(outbox)))
    }
}

/// Logs to stderr (stdout is the program's own), filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
