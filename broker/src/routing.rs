//! The routing core: an embedded rumqttd on 127.0.0.1 that only the gate may reach.
//!
//! rumqttd routes everything that is not telemetry (state, commands, events) between the
//! gate's per-device links and, later, Tellus's own in-process links. It is never exposed:
//! it listens on loopback, on a port chosen at start, and accepts only CONNECTs that carry
//! the per-process [`GateCredential`], which the gate writes into every forwarded CONNECT.
//! Telemetry does not pass through it, so its router segments are kept small.
//!
//! Tellus itself publishes to devices (issued certificates; later commands and desired
//! state) through a [`Publisher`]: one MQTT link of its own into the routing core, under a
//! client id no device can have.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    thread,
    time::{Duration, Instant},
};

use rand::RngCore;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The username the gate presents to the routing core.
const GATE_USER: &str = "tellus-gate";

/// How long to wait for rumqttd to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The secret login that identifies the gate to the routing core; new on every start.
#[derive(Clone)]
pub struct GateCredential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for GateCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateCredential")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Sizing of the routing core.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Most simultaneous links (gate connections plus internal links).
    pub max_connections: usize,
    /// Largest packet routed, in bytes.
    pub max_packet_size: usize,
}

/// A running routing core.
#[derive(Debug, Clone)]
pub struct RoutingCore {
    /// Where it takes MQTT 3.1.1 links.
    pub addr: SocketAddr,
    /// Where it takes MQTT 5 links: the gate links each device in the device's own version,
    /// so that MQTT 5 properties travel both ways.
    pub addr_v5: SocketAddr,
    pub credential: GateCredential,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("could not reserve a loopback port for the routing core: {0}")]
    Port(std::io::Error),
    #[error("could not start the routing core thread: {0}")]
    Thread(std::io::Error),
    #[error("the routing core did not accept the gate on {0} within {1:?}: {2}")]
    NotReady(SocketAddr, Duration, String),
}

/// Starts rumqttd on its own threads and waits until it accepts connections.
///
/// rumqttd binds its listener itself and has no way to stop, so the port is reserved by
/// binding and releasing it, and the core lives as long as the process.
pub fn start(config: &RoutingConfig) -> Result<RoutingCore, RoutingError> {
    // Both ports are held until both are known, so that they differ.
    let reserve = || StdListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(RoutingError::Port);
    let (first, second) = (reserve()?, reserve()?);
    let port = |l: &StdListener| l.local_addr().map_err(RoutingError::Port);
    let (addr, addr_v5) = (port(&first)?, port(&second)?);
    drop((first, second));
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let credential = GateCredential {
        username: GATE_USER.to_owned(),
        password: hex::encode(secret),
    };

    let connections = ConnectionSettings {
        connection_timeout_ms: 5_000,
        // A device's publish may grow on its way here: the gate resolves MQTT 5 topic
        // aliases, adding at most a whole topic (64 KiB) to a packet within the limit.
        max_payload_size: config.max_packet_size + 65_536,
        max_inflight_count: 100,
        auth: Some(HashMap::from([(
            credential.username.clone(),
            credential.password.clone(),
        )])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let rumqttd_config = Config {
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: config.max_packet_size.max(64 * 1024),
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(
            "gate".to_owned(),
            server("routing-core", addr),
        )])),
        v5: Some(HashMap::from([(
            "gate".to_owned(),
            server("routing-core-v5", addr_v5),
        )])),
        ..Default::default()
    };

    let mut broker = Broker::new(rumqttd_config);
    thread::Builder::new()
        .name("routing-core".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "routing core stopped");
            }
        })
        .map_err(RoutingError::Thread)?;

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut attempt = 0u32;
    for (listen, v5) in [(addr, false), (addr_v5, true)] {
        // A new client id for every attempt: rumqttd 0.20 keeps a will handler per client
        // id, leaks it when a link closes before its CONNACK is written (as a timed-out
        // probe's does), and panics on the next CONNECT with that id.
        while let Err(e) = {
            attempt += 1;
            probe(
                listen,
                v5,
                &format!("tellus-gate-probe-{attempt}"),
                &credential,
            )
        } {
            if Instant::now() > deadline {
                return Err(RoutingError::NotReady(listen, READY_TIMEOUT, e));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    tracing::debug!(%addr, %addr_v5, "routing core listening");
    Ok(RoutingCore {
        addr,
        addr_v5,
        credential,
    })
}

/// Logs in to the routing core as the gate (in MQTT 5 if `v5`, else 3.1.1) and out again:
/// proves it listens, speaks MQTT and knows the credential.
fn probe(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    credential: &GateCredential,
) -> Result<(), String> {
    use std::io::{Read, Write};

    use rumqttc::{mqttbytes::v4, v5::mqttbytes::v5 as m5};

    let mut stream =
        StdStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let (user, password) = (credential.username.clone(), credential.password.clone());
    let mut out = bytes::BytesMut::new();
    if v5 {
        let connect = m5::Connect {
            keep_alive: 10,
            client_id: client_id.into(),
            clean_start: true,
            properties: None,
        };
        let login = Some(m5::Login::new(user, password));
        let disconnect = m5::Disconnect::new(m5::DisconnectReasonCode::NormalDisconnection);
        for packet in [
            m5::Packet::Connect(connect, None, login),
            m5::Packet::Disconnect(disconnect),
        ] {
            packet.write(&mut out, None).map_err(|e| e.to_string())?;
        }
    } else {
        let mut connect = v4::Connect::new(client_id);
        connect.set_login(user, password);
        for packet in [v4::Packet::Connect(connect), v4::Packet::Disconnect] {
            packet
                .write(&mut out, usize::MAX)
                .map_err(|e| e.to_string())?;
        }
    }
    stream.write_all(&out).map_err(|e| e.to_string())?;
    // CONNACK: type, remaining length, session-present flag, then the return (3.1.1) or
    // reason (5) code, 0 for success in both.
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).map_err(|e| e.to_string())?;
    match connack {
        [0x20, _, _, 0] => Ok(()),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// The client id of Tellus's own link, before the number of the attempt; `:` is not allowed
/// in device ids, so no device can take it over.
const PUBLISHER_ID: &str = "tellus:publisher";

/// Requests that may wait for the publisher's link; past this `publish` waits.
const PUBLISHER_QUEUE: usize = 1_024;

/// What Tellus publishes, told by its topic: what `tellus_messages_out_total` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// `devices/{id}/commands/{command_id}`
    Command,
    /// `devices/{id}/state/desired` (an empty one clears a deleted device's)
    DesiredState,
    /// `devices/{id}/certs/issued`
    Certificate,
    /// `rules/…`, a rule's `publish` action
    Rule,
    /// Any other topic
    Other,
}

impl OutKind {
    pub const ALL: [OutKind; 5] = [
        OutKind::Command,
        OutKind::DesiredState,
        OutKind::Certificate,
        OutKind::Rule,
        OutKind::Other,
    ];

    pub fn of(topic: &str) -> OutKind {
        use tellus_core::topic::DeviceTopic;
        match tellus_core::topic::parse(topic) {
            Some((_, DeviceTopic::Command(_))) => OutKind::Command,
            Some((_, DeviceTopic::StateDesired)) => OutKind::DesiredState,
            Some((_, DeviceTopic::CertsIssued)) => OutKind::Certificate,
            _ if topic.starts_with("rules/") => OutKind::Rule,
            _ => OutKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutKind::Command => "command",
            OutKind::DesiredState => "desired_state",
            OutKind::Certificate => "certificate",
            OutKind::Rule => "rule",
            OutKind::Other => "other",
        }
    }
}

/// Messages the publisher's link has taken, by kind: each is handed to the routing core,
/// which delivers it to whoever subscribes (none, for a device not listening).
#[derive(Debug, Default)]
pub struct PublisherStats {
    published: [std::sync::atomic::AtomicU64; OutKind::ALL.len()],
}

impl PublisherStats {
    /// Messages published of this kind since the process started.
    pub fn published(&self, kind: OutKind) -> u64 {
        self.published[kind as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, kind: OutKind) {
        self.published[kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A message for a device.
#[derive(Debug, Clone)]
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Outgoing {
    /// Hands the message to `client`; gives it back if the link has ended.
    async fn offer(self, client: &rumqttc::AsyncClient) -> Option<Outgoing> {
        let kept = self.clone();
        client
            .publish(
                self.topic,
                rumqttc::QoS::AtLeastOnce,
                self.retain,
                self.payload,
            )
            .await
            .err()
            .map(|_| kept)
    }
}

/// Tellus's own link into the routing core, for messages to devices. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    requests: tokio::sync::mpsc::Sender<Outgoing>,
    /// How many times the link has connected (CONNACKs from the routing core).
    links: tokio::sync::watch::Receiver<u64>,
    stats: std::sync::Arc<PublisherStats>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connects to the routing core as Tellus and keeps the link up until `shutdown` is
    /// cancelled. Must run inside a tokio runtime.
    ///
    /// Every attempt connects under a client id of its own (`tellus:publisher:<n>`): rumqttd
    /// 0.20 keeps a will handler per client id that leaks when a link fails before its
    /// CONNACK, and then panics on the next CONNECT with that id, which would take the
    /// routing core down for every device.
    pub fn start(
        core: &RoutingCore,
        max_packet_size: usize,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Publisher {
        let core = core.clone();
        let (requests, mut incoming) = tokio::sync::mpsc::channel::<Outgoing>(PUBLISHER_QUEUE);
        let (linked, links) = tokio::sync::watch::channel(0);
        let stats = std::sync::Arc::new(PublisherStats::default());
        let counted = stats.clone();
        // Hands a request to the link and counts it once taken; gives it back if not.
        let offer = move |o: Outgoing, client: rumqttc::AsyncClient| {
            let counted = counted.clone();
            async move {
                let kind = OutKind::of(&o.topic);
                let unsent = o.offer(&client).await;
                if unsent.is_none() {
                    counted.count(kind);
                }
                unsent
            }
        };
        tokio::spawn(async move {
            // A request the last link failed to take, sent first on the next one.
            let mut unsent: Option<Outgoing> = None;
            for attempt in 1u64.. {
                let mut options = rumqttc::MqttOptions::new(
                    format!("{PUBLISHER_ID}:{attempt}"),
                    core.addr.ip().to_string(),
                    core.addr.port(),
                );
                options
                    .set_credentials(
                        core.credential.username.clone(),
                        core.credential.password.clone(),
                    )
                    .set_keep_alive(Duration::from_secs(30))
                    .set_max_packet_size(max_packet_size, max_packet_size)
                    .set_request_channel_capacity(PUBLISHER_QUEUE);
                let (client, mut events) = rumqttc::AsyncClient::new(options, PUBLISHER_QUEUE);
                let linked = linked.clone();
                // The link's own task, so that a publish waiting for room in rumqttc's queue
                // never keeps the link from being driven.
                let mut link = tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                                linked.send_modify(|n| *n += 1);
                            }
                            Ok(_) => {}
                            Err(e) => return e,
                        }
                    }
                });
                if let Some(o) = unsent.take() {
                    unsent = offer(o, client.clone()).await;
                }
                loop {
                    tokio::select! {
                        // A link that ended is noticed before another request is taken.
                        biased;
                        _ = shutdown.cancelled() => {
                            link.abort();
                            return;
                        }
                        ended = &mut link => {
                            if let Ok(e) = ended {
                                tracing::warn!(error = %e, "publisher link to the routing core lost; reconnecting");
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                        request = incoming.recv() => {
                            let Some(o) = request else {
                                link.abort();
                                return;
                            };
                            // A failure means the link ended (the loop notices it next): the
                            // request goes out on the next link.
                            unsent = offer(o, client.clone()).await;
                        }
                    }
                }
            }
        });
        Publisher {
            requests,
            links,
            stats,
        }
    }

    /// Messages published so far, by kind.
    pub fn stats(&self) -> std::sync::Arc<PublisherStats> {
        self.stats.clone()
    }

    /// How many messages wait for the link (at most 1,024; past that `publish` waits).
    pub fn gauge(&self) -> tellus_core::QueueGauge {
        tellus_core::QueueGauge::of(&self.requests)
    }

    /// Changes each time the link to the routing core is made (again): publishes queued
    /// while it was down may have been lost.
    pub fn links(&self) -> tokio::sync::watch::Receiver<u64> {
        self.links.clone()
    }

    /// A publisher with no link: every publish fails with [`PublishError`], as after a
    /// shutdown. For parts of Tellus run without a routing core (the API's own tests).
    pub fn detached() -> Publisher {
        let (requests, _) = tokio::sync::mpsc::channel(1);
        let (_, links) = tokio::sync::watch::channel(0);
        Publisher {
            requests,
            links,
            stats: Default::default(),
        }
    }

    /// Publishes `payload` on `topic` at QoS 1, waiting while the link's queue is full.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), PublishError> {
        self.send(topic, payload, false).await
    }

    /// Like [`Publisher::publish`], retained: the routing core keeps the last one of the topic
    /// (until it stops) for whoever subscribes.
    pub async fn publish_retained(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        self.send(topic, payload, true).await
    }

    async fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), PublishError> {
        let outgoing = Outgoing {
            topic,
            payload,
            retain,
        };
        self.requests.send(outgoing).await.map_err(|_| PublishError)
    }
}

/// The publisher's link has stopped (Tellus is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the publisher's link to the routing core has stopped")]
pub struct PublishError;
