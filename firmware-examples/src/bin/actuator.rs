//! `actuator`: a valve that Tellus drives, through commands and through desired state.
//!
//! - Commands: `open` and `close` move the valve at once and answer with its new position;
//!   `status` answers with the whole state; anything else is answered "unknown command".
//! - Desired state: `{"valve": "open"|"closed", "flow_limit": <litres/min>}`; the device
//!   applies what it understands and reports what it did, so that Tellus's delta empties.
//! - Every few seconds a reading of the flow through the valve.
//!
//! ```sh
//! tellus device create valve-01 --out certs
//! cargo run -p tellus-firmware-examples --bin actuator -- --certs certs --id valve-01
//! ```

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser;
use serde_json::{json, Value};
use tellus_device::Reading;
use tellus_firmware_examples::{init_logging, DeviceArgs};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    device: DeviceArgs,
    /// Milliseconds between flow readings.
    #[arg(long, default_value_t = 5_000)]
    every_ms: u64,
}

/// The hardware, as far as this example has any.
#[derive(Debug, Clone)]
struct Valve {
    open: bool,
    flow_limit: f64,
}

impl Valve {
    fn state(&self) -> Value {
        json!({
            "valve": if self.open { "open" } else { "closed" },
            "flow_limit": self.flow_limit,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let valve = Arc::new(Mutex::new(Valve {
        open: false,
        flow_limit: 10.0,
    }));
    // Handlers run before the device exists, so what must be reported goes through a
    // channel to the loop below, which owns the device.
    let (changed_tx, mut changed) = mpsc::channel::<Value>(16);

    let mut builder = args.device.builder()?;
    for (name, open) in [("open", true), ("close", false)] {
        let (valve, changed_tx) = (valve.clone(), changed_tx.clone());
        builder = builder.on_command(name, move |_cmd| {
            let (valve, changed_tx) = (valve.clone(), changed_tx.clone());
            async move {
                let state = {
                    let mut v = valve.lock().map_err(|_| "valve state is poisoned")?;
                    v.open = open;
                    v.state()
                };
                println!("command: valve {}", state["valve"]);
                let _ = changed_tx.send(state.clone()).await;
                Ok(state)
            }
        });
    }
    let status = valve.clone();
    builder = builder.on_command("status", move |_cmd| {
        let status = status.clone();
        async move {
            Ok(status
                .lock()
                .map_err(|_| "valve state is poisoned")?
                .state())
        }
    });
    let (desired_valve, desired_tx) = (valve.clone(), changed_tx.clone());
    builder = builder.on_desired(move |desired| {
        let (valve, changed_tx) = (desired_valve.clone(), desired_tx.clone());
        async move {
            let state = {
                let Ok(mut v) = valve.lock() else { return };
                match desired.state["valve"].as_str() {
                    Some("open") => v.open = true,
                    Some("closed") => v.open = false,
                    _ => {}
                }
                if let Some(limit) = desired.state["flow_limit"].as_f64() {
                    v.flow_limit = limit.clamp(0.0, 100.0);
                }
                v.state()
            };
            println!("desired state version {}: {state}", desired.version);
            let _ = changed_tx.send(state).await;
        }
    });
    let device = builder.start()?;
    let first = valve.lock().map(|v| v.state()).unwrap_or_default();
    device.report_state(first).await?;

    let mut tick = tokio::time::interval(Duration::from_millis(args.every_ms.max(1)));
    loop {
        tokio::select! {
            Some(state) = changed.recv() => device.report_state(state).await?,
            _ = tick.tick() => {
                let (open, limit) = valve.lock().map(|v| (v.open, v.flow_limit)).unwrap_or((false, 0.0));
                let flow = if open { limit * (0.9 + 0.1 * rand_unit()) } else { 0.0 };
                device.send(Reading::now().with("flow_lpm", (flow * 100.0).round() / 100.0).with("open", open)).await?;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    device.close().await;
    Ok(())
}

/// A number in [0, 1) from the clock: enough noise for a chart, no dependency for it.
fn rand_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000) / 1_000.0
}
