//! `sensor`: a device that takes a reading at a steady pace and never loses one.
//!
//! Each reading (a temperature, and `n`, its number) goes to the outbox on disk first and
//! leaves it only once Tellus has stored it: stop Tellus, or kill this program and start it
//! again, and every reading still arrives, once. See `firmware-examples/README.md`.
//!
//! ```sh
//! tellus device create sensor-01 --out certs
//! cargo run -p tellus-firmware-examples --bin sensor -- --certs certs --id sensor-01
//! ```

use std::time::Duration;

use clap::{Parser, ValueEnum};
use tellus_device::{Format, Reading, Time};
use tellus_firmware_examples::{init_logging, DeviceArgs};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    device: DeviceArgs,
    /// Milliseconds between readings.
    #[arg(long, default_value_t = 5_000)]
    every_ms: u64,
    /// Stop taking readings after this many (0: never); the program goes on sending.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// The number of the first reading.
    #[arg(long, default_value_t = 0)]
    first: u64,
    #[arg(long, value_enum, default_value_t = Wire::Json)]
    format: Wire,
}

#[derive(Clone, Copy, ValueEnum)]
enum Wire {
    Json,
    Protobuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let device = args
        .device
        .builder()?
        .format(match args.format {
            Wire::Json => Format::Json,
            Wire::Protobuf => Format::Protobuf,
        })
        .start()?;
    device
        .report_state(serde_json::json!({ "firmware": env!("CARGO_PKG_VERSION") }))
        .await?;

    let mut tick = tokio::time::interval(Duration::from_millis(args.every_ms.max(1)));
    let last = if args.count == 0 {
        u64::MAX
    } else {
        args.first.saturating_add(args.count)
    };
    for n in args.first..last {
        tick.tick().await;
        // A gentle curve, so charts have something to show.
        let temperature = 21.0 + 3.0 * ((n as f64) / 20.0).sin();
        let reading = Reading::now()
            .with("temperature", (temperature * 100.0).round() / 100.0)
            .with("n", n as i64);
        let ts = match reading.time() {
            Time::Device(ts) => ts,
            Time::Server => 0,
        };
        device.send(reading).await?;
        // Printed only once the reading is on disk: whoever reads this may count on it.
        println!("recorded n={n} ts={ts}");
    }
    println!("all recorded");
    // Keep sending what waits (and answering Tellus) until stopped.
    tokio::signal::ctrl_c().await?;
    device.close().await;
    Ok(())
}
