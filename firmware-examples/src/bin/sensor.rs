//! `sensor`: a device that publishes a temperature reading every few seconds, QoS 1, and
//! prints each acknowledgement (an acknowledged reading is durable in Tellus).
//!
//! ```sh
//! tellus device create sensor-01 --out certs
//! cargo run -p tellus-firmware-examples --bin sensor -- --certs certs --id sensor-01
//! ```

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tellus_device::{mqtt_options, Credentials};

#[derive(Parser)]
struct Args {
    /// Folder with <id>.crt, <id>.key and ca.crt.
    #[arg(long)]
    certs: PathBuf,
    /// The device id (the certificate's CN).
    #[arg(long)]
    id: String,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// Seconds between readings.
    #[arg(long, default_value_t = 5)]
    every: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let creds = Credentials::from_dir(&args.certs, &args.id)?;
    let (client, mut events) = AsyncClient::new(mqtt_options(&creds, &args.host, args.port)?, 10);
    let topic = creds.telemetry_topic();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(args.every.max(1)));
        for n in 0u64.. {
            tick.tick().await;
            // A gentle daily-looking curve, so charts have something to show.
            let temperature = 21.0 + 3.0 * ((n as f64) / 20.0).sin();
            let body = serde_json::json!({ "temperature": (temperature * 100.0).round() / 100.0 });
            if client
                .publish(&topic, QoS::AtLeastOnce, false, body.to_string())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => println!("connected as {}", creds.id),
            Ok(Event::Incoming(Packet::PubAck(ack))) => println!("reading {} stored", ack.pkid),
            Ok(_) => {}
            Err(e) => {
                // rumqttc reconnects on the next poll; wait a little so a refused connection
                // does not spin.
                eprintln!("connection error: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}
