//! rumqttc helpers shared by the end-to-end tests: connect, publish and wait, expect a
//! refusal; each waits at most [`WAIT`] and panics with what went wrong.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};

/// How long a test waits for one answer from the server.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls until CONNACK; panics on an error.
pub async fn connect(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options, 100);
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("connect failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no CONNACK in time");
    (client, events)
}

/// Publishes at QoS 1 and polls until the PUBACK; panics on an error.
pub async fn publish_acked(
    client: &AsyncClient,
    events: &mut EventLoop,
    topic: &str,
    payload: &str,
) {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publish failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no PUBACK in time");
}

/// Polls until the connection fails, and returns why; panics if a PUBACK or SUBACK arrives.
pub async fn expect_refused(events: &mut EventLoop) -> ConnectionError {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p @ (Packet::PubAck(_) | Packet::SubAck(_)))) => {
                    panic!("expected a refusal, got {p:?}")
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("connection was not closed")
}
