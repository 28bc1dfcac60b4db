//! Reading whole MQTT frames off a byte stream.
//!
//! The device side is decoded into packets of the device's MQTT version (every packet is
//! checked); the routing-core side is cut into raw frames, which the writer copies to the
//! device unchanged. The fixed header, and so the framing, is the same in MQTT 3.1.1 and 5.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::codec::{self, Inbound, Version};

/// Why a stream stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {0} bytes is larger than the limit of {1}")]
    TooLarge(usize, usize),
}

/// Buffers a stream and cuts it into MQTT frames no larger than `max_size`.
pub struct FrameReader<R> {
    stream: R,
    buf: BytesMut,
    max_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(stream: R, max_size: usize) -> Self {
        FrameReader {
            stream,
            buf: BytesMut::with_capacity(4096),
            max_size,
        }
    }

    /// The next packet, decoded as `version`. Cancel-safe: bytes read stay in the buffer.
    pub async fn packet(&mut self, version: Version) -> Result<Inbound, FrameError> {
        let frame = self.frame_mut().await?;
        codec::decode(version, frame).map_err(FrameError::Malformed)
    }

    /// The next frame, unparsed. Cancel-safe like [`Self::packet`].
    pub async fn frame(&mut self) -> Result<Bytes, FrameError> {
        Ok(self.frame_mut().await?.freeze())
    }

    pub async fn frame_mut(&mut self) -> Result<BytesMut, FrameError> {
        loop {
            match mqttbytes::check(self.buf.iter(), self.max_size) {
                Ok(header) => return Ok(self.buf.split_to(header.frame_length())),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await?,
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    /// The MQTT version of the connection, from its first frame (left unread): the level
    /// its CONNECT names, as `Err` if the gate does not speak it. A first frame that is no
    /// CONNECT with a known protocol name is read as 3.1.1, which refuses it.
    pub async fn version(&mut self) -> Result<Result<Version, u8>, FrameError> {
        Ok(match self.peek_connect_level().await? {
            None => Ok(Version::V4),
            Some(level) => Version::from_level(level).ok_or(level),
        })
    }

    /// The protocol level a CONNECT asks for (4 is MQTT 3.1.1, 5 is MQTT 5, 3 is MQTT 3.1),
    /// read from the next whole frame without consuming it. `None` if the frame is no
    /// CONNECT with a recognisable protocol name.
    async fn peek_connect_level(&mut self) -> Result<Option<u8>, FrameError> {
        let header = loop {
            match mqttbytes::check(self.buf.iter(), self.max_size) {
                Ok(header) => break header,
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await?,
                Err(e) => return Err(self.classify(e)),
            }
        };
        let frame = &self.buf[..header.frame_length()];
        if frame.first().map(|b| b >> 4) != Some(1) {
            return Ok(None);
        }
        // After the type byte, the remaining length takes one to four bytes, each but the
        // last with its high bit set; then the protocol name (a length-prefixed string) and
        // the level.
        let length_bytes = frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
        let body = frame.get(1 + length_bytes..).unwrap_or_default();
        let level = match body {
            [0, 4, b'M', b'Q', b'T', b'T', level, ..] => Some(*level),
            [0, 6, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => Some(*level),
            _ => None,
        };
        Ok(level)
    }

    fn classify(&self, e: mqttbytes::Error) -> FrameError {
        match e {
            mqttbytes::Error::PayloadSizeLimitExceeded(n) => FrameError::TooLarge(n, self.max_size),
            e => FrameError::Malformed(e.to_string()),
        }
    }

    async fn fill(&mut self) -> Result<(), FrameError> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(if self.buf.is_empty() {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        Ok(())
    }
}

/// The MQTT packet type of a raw frame (the high nibble of its first byte).
pub fn packet_type(frame: &[u8]) -> u8 {
    frame.first().map(|b| b >> 4).unwrap_or(0)
}

/// The packet type number of PUBLISH.
pub const PUBLISH: u8 = 3;
/// The packet type number of PUBACK.
pub const PUBACK: u8 = 4;
/// The packet type number of SUBACK.
pub const SUBACK: u8 = 9;
/// The packet type number of UNSUBSCRIBE.
pub const UNSUBSCRIBE: u8 = 10;
/// The packet type number of PINGRESP.
pub const PINGRESP: u8 = 13;

// Entry points for `fuzz/`, which drives the real reader with arbitrary input and arbitrary
// splits into socket reads.

/// What the gate's device-side reader makes of `input`, delivered as socket reads of at most
/// `read_size` bytes: the connection's version as [`FrameReader::version`] tells it (no
/// packets if the gate does not speak it), the packets [`FrameReader::packet`] decodes, and
/// why it stopped (`Closed` or `Truncated` once the input is used up). For the fuzz
/// targets; the server does not call it.
#[doc(hidden)]
pub fn fuzz_packets(
    input: &[u8],
    read_size: usize,
    max_packet_size: usize,
) -> (Result<Version, u8>, Vec<Inbound>, FrameError) {
    let mut reader = FrameReader::new(Chunked::new(input, read_size), max_packet_size);
    let mut packets = Vec::new();
    futures::executor::block_on(async {
        let version = match reader.version().await {
            Ok(Ok(v)) => v,
            Ok(Err(level)) => return (Err(level), packets, FrameError::Closed),
            Err(e) => return (Ok(Version::V4), packets, e),
        };
        loop {
            match reader.packet(version).await {
                Ok(p) => packets.push(p),
                Err(e) => return (Ok(version), packets, e),
            }
        }
    })
}

/// Like [`fuzz_packets`] for the routing-core side's reader (`FrameReader::frame`), which
/// cuts frames by their fixed header without parsing them.
#[doc(hidden)]
pub fn fuzz_frames(
    input: &[u8],
    read_size: usize,
    max_packet_size: usize,
) -> (Vec<Bytes>, FrameError) {
    let mut reader = FrameReader::new(Chunked::new(input, read_size), max_packet_size);
    let mut frames = Vec::new();
    futures::executor::block_on(async {
        loop {
            match reader.frame().await {
                Ok(f) => frames.push(f),
                Err(e) => return (frames, e),
            }
        }
    })
}

/// A socket that delivers `data` in reads of at most `read_size` bytes, then end of stream.
/// Always ready, so a future reading it completes under `futures::executor::block_on`.
struct Chunked<'a> {
    data: &'a [u8],
    read_size: usize,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], read_size: usize) -> Self {
        Chunked {
            data,
            read_size: read_size.max(1),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.read_size.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::{v4, QoS};
    use rumqttc::v5::mqttbytes::v5;

    use super::*;

    fn v4_bytes(p: v4::Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        p.write(&mut buf, usize::MAX).unwrap();
        buf.to_vec()
    }

    #[tokio::test]
    async fn cuts_frames_across_reads_and_refuses_oversized_ones() {
        let mut p = v4::Publish::new("devices/a/telemetry", QoS::AtLeastOnce, vec![7u8; 100]);
        p.pkid = 3;
        let one = v4_bytes(v4::Packet::Publish(p));
        let mut two = one.clone();
        two.extend_from_slice(&v4_bytes(v4::Packet::PingReq));
        let (mut client, server) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&two).await.unwrap();
        });
        let mut r = FrameReader::new(server, 1024);
        match r.packet(Version::V4).await.unwrap() {
            Inbound::Publish(p) => assert_eq!((p.pkid, p.payload.len()), (3, 100)),
            other => panic!("{other:?}"),
        }
        assert_eq!(packet_type(&r.frame().await.unwrap()), 12);
        writer.await.unwrap();
        assert!(matches!(
            r.packet(Version::V4).await,
            Err(FrameError::Closed)
        ));

        let mut small = FrameReader::new(&one[..], 50);
        assert!(matches!(
            small.packet(Version::V4).await,
            Err(FrameError::TooLarge(..))
        ));
        let mut cut = FrameReader::new(&one[..10], 1024);
        assert!(matches!(
            cut.packet(Version::V4).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn the_connect_names_the_version_without_being_consumed() {
        let connect = v4_bytes(v4::Packet::Connect(v4::Connect::new("d")));
        let mut r = FrameReader::new(&connect[..], 1024);
        assert_eq!(r.version().await.unwrap(), Ok(Version::V4));
        assert!(matches!(
            r.packet(Version::V4).await,
            Ok(Inbound::Connect(_))
        ));

        let mut buf = BytesMut::new();
        let c = v5::Connect {
            keep_alive: 30,
            client_id: "d".into(),
            clean_start: true,
            properties: None,
        };
        v5::Packet::Connect(c, None, None)
            .write(&mut buf, None)
            .unwrap();
        let mut r = FrameReader::new(&buf[..], 1024);
        assert_eq!(r.version().await.unwrap(), Ok(Version::V5));
        assert!(matches!(
            r.packet(Version::V5).await,
            Ok(Inbound::Connect(_))
        ));

        // MQTT 3.1 ("MQIsdp", level 3) is named, and refused by the caller.
        let mut mqisdp = vec![0x10, 12, 0, 6];
        mqisdp.extend_from_slice(b"MQIsdp");
        mqisdp.extend_from_slice(&[3, 2, 0, 60]);
        let mut r = FrameReader::new(&mqisdp[..], 1024);
        assert_eq!(r.version().await.unwrap(), Err(3));

        // Anything but a CONNECT is read as 3.1.1, which the session refuses.
        let ping = v4_bytes(v4::Packet::PingReq);
        let mut r = FrameReader::new(&ping[..], 1024);
        assert_eq!(r.version().await.unwrap(), Ok(Version::V4));
    }
}
