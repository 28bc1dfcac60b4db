//! A raw MQTT 3.1.1 device over mTLS: sends exactly the packets a test writes and returns
//! exactly what the server answers, for the cases a well-behaved client library never
//! produces (re-sent QoS 2 publishes, stray PUBRELs, other protocol versions, silence).

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    self,
    v4::{ConnAck, Connect, ConnectReturnCode, Packet},
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
        tokio::time::timeout(ANSWER, async {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
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

    /// Reads until the server closes the connection; panics on any packet but those
    /// `allowed` returns true for.
    pub async fn expect_closed(&mut self, allowed: impl Fn(&Packet) -> bool) {
        while let Some(p) = self.recv().await {
            assert!(allowed(&p), "expected the connection to close, got {p:?}");
        }
    }
}
