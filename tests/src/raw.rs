//! A raw MQTT device over mTLS (3.1.1, or 5 with the `*5` methods): sends exactly the
//! packets a test writes and returns exactly what the server answers, for the cases a
//! well-behaved client library never produces (re-sent QoS 2 publishes, stray PUBRELs, other
//! protocol versions, silence, bad topic aliases).

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use rumqttc::{
    mqttbytes::{
        self,
        v4::{ConnAck, Connect, ConnectReturnCode, Packet},
    },
    v5::mqttbytes::{self as mqttbytes5, v5},
};
use tellus_device::Credentials;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::Tellus;

/// How long a test waits for one answer.
const ANSWER: Duration = Duration::from_secs(20);

pub struct RawDevice {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawDevice {
    /// A TLS connection as `creds`, before any MQTT.
    pub async fn tls(t: &Tellus, creds: &Credentials) -> RawDevice {
        let tcp = TcpStream::connect(t.mqtt_addr).await.unwrap();
        Self::tls_over(tcp, creds).await
    }

    /// TLS as `creds` over an already connected socket.
    pub async fn tls_over(tcp: TcpStream, creds: &Credentials) -> RawDevice {
        let connector = TlsConnector::from(Arc::new(creds.tls_config().unwrap()));
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = connector.connect(name, tcp).await.expect("TLS handshake");
        RawDevice {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A device over an established TLS session.
    pub fn from_tls(stream: TlsStream<TcpStream>) -> RawDevice {
        RawDevice {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A TLS connection and an accepted MQTT 3.1.1 CONNECT with this keep-alive.
    pub async fn connected(t: &Tellus, creds: &Credentials, keep_alive: u16) -> RawDevice {
        let mut d = Self::tls(t, creds).await;
        let mut connect = Connect::new(creds.id.as_str());
        connect.keep_alive = keep_alive;
        d.send(&Packet::Connect(connect)).await;
        assert_eq!(
            d.recv().await,
            Some(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success
            }))
        );
        d
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.try_send_bytes(bytes).await.unwrap();
    }

    /// Sends bytes; an error means the server has closed the connection.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next packet, or `None` once the server has closed the connection. Panics if
    /// nothing arrives within 20 s.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_with(|buf| match Packet::read(buf, usize::MAX) {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        })
        .await
    }

    /// Reads packets with `read` (the packet, `None` for more bytes, or why it is malformed).
    async fn recv_with<P>(
        &mut self,
        read: impl Fn(&mut BytesMut) -> Result<Option<P>, String>,
    ) -> Option<P> {
        tokio::time::timeout(ANSWER, async {
            loop {
                match read(&mut self.buf) {
                    Ok(Some(p)) => return Some(p),
                    Ok(None) => {}
                    Err(e) => panic!("server sent a malformed packet: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no answer from the server in time")
    }

    pub async fn send5(&mut self, packet: &v5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.send_bytes(&out).await;
    }

    /// Like [`Self::recv`], for a device that speaks MQTT 5.
    pub async fn recv5(&mut self) -> Option<v5::Packet> {
        self.recv_with(|buf| match v5::Packet::read(buf, None) {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes5::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        })
        .await
    }

    /// A TLS connection and an MQTT 5 CONNECT with `properties`; returns the CONNACK.
    pub async fn connect5(
        t: &Tellus,
        creds: &Credentials,
        client_id: &str,
        properties: Option<v5::ConnectProperties>,
    ) -> (RawDevice, v5::ConnAck) {
        let mut d = Self::tls(t, creds).await;
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start: true,
            properties,
        };
        d.send5(&v5::Packet::Connect(connect, None, None)).await;
        match d.recv5().await {
            Some(v5::Packet::ConnAck(ack)) => (d, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Reads until the server closes the connection; panics on any packet but those
    /// `allowed` returns true for.
    pub async fn expect_closed(&mut self, allowed: impl Fn(&Packet) -> bool) {
        while let Some(p) = self.recv().await {
            assert!(allowed(&p), "expected the connection to close, got {p:?}");
        }
    }
}
