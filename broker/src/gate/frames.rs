//! Reading whole MQTT frames off a byte stream.
//!
//! The device side is parsed into packets (every packet is checked); the routing-core side is
//! cut into raw frames, which the writer copies to the device unchanged.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4::Packet};
use tokio::io::{AsyncRead, AsyncReadExt};

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
    Malformed(mqttbytes::Error),
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

    /// The next parsed packet. Cancel-safe: bytes read stay in the buffer.
    pub async fn packet(&mut self) -> Result<Packet, FrameError> {
        loop {
            match Packet::read(&mut self.buf, self.max_size) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await?,
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    /// The next frame, unparsed. Cancel-safe like [`Self::packet`].
    pub async fn frame(&mut self) -> Result<Bytes, FrameError> {
        loop {
            match mqttbytes::check(self.buf.iter(), self.max_size) {
                Ok(header) => return Ok(self.buf.split_to(header.frame_length()).freeze()),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await?,
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    /// The protocol level a CONNECT asks for (4 is MQTT 3.1.1, 5 is MQTT 5, 3 is MQTT 3.1),
    /// read from the next whole frame without consuming it: an MQTT 5 CONNECT must be
    /// refused before the 3.1.1 parser misreads its properties. `None` if the frame is no
    /// CONNECT with a recognisable protocol name.
    pub async fn peek_connect_level(&mut self) -> Result<Option<u8>, FrameError> {
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
            e => FrameError::Malformed(e),
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

/// Serialises a packet the gate writes itself.
pub fn encode(packet: &Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.size() + 5);
    // Packets the gate builds or relays were read within the size limit; the limit here is
    // only the codec's own ceiling.
    match packet.write(&mut buf, usize::MAX) {
        Ok(_) => buf.freeze(),
        Err(e) => {
            tracing::error!(error = %e, ?packet, "could not encode packet");
            Bytes::new()
        }
    }
}

/// The MQTT packet type of a raw frame (the high nibble of its first byte).
pub fn packet_type(frame: &[u8]) -> u8 {
    frame.first().map(|b| b >> 4).unwrap_or(0)
}

/// The packet type number of PUBACK.
pub const PUBACK: u8 = 4;
/// The packet type number of PINGRESP.
pub const PINGRESP: u8 = 13;

// Entry points for `fuzz/`, which drives the real reader with arbitrary input and arbitrary
// splits into socket reads.

/// The packets the gate's device-side reader (`FrameReader::packet`) yields from `input`,
/// delivered as socket reads of at most `read_size` bytes, and why it stopped (`Closed` or
/// `Truncated` once the input is used up). For the fuzz targets; the server does not call it.
#[doc(hidden)]
pub fn fuzz_packets(
    input: &[u8],
    read_size: usize,
    max_packet_size: usize,
) -> (Vec<Packet>, FrameError) {
    let mut reader = FrameReader::new(Chunked::new(input, read_size), max_packet_size);
    let mut packets = Vec::new();
    futures::executor::block_on(async {
        loop {
            match reader.packet().await {
                Ok(p) => packets.push(p),
                Err(e) => return (packets, e),
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
    use rumqttc::mqttbytes::{v4::Publish, QoS};

    use super::*;

    #[tokio::test]
    async fn cuts_frames_across_reads_and_refuses_oversized_ones() {
        let mut p = Publish::new("devices/a/telemetry", QoS::AtLeastOnce, vec![7u8; 100]);
        p.pkid = 3;
        let one = encode(&Packet::Publish(p.clone()));
        let mut two = one.to_vec();
        two.extend_from_slice(&encode(&Packet::PingReq));
        let (mut client, server) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&two).await.unwrap();
        });
        let mut r = FrameReader::new(server, 1024);
        assert_eq!(r.packet().await.unwrap(), Packet::Publish(p));
        assert_eq!(packet_type(&r.frame().await.unwrap()), 12);
        writer.await.unwrap();
        assert!(matches!(r.packet().await, Err(FrameError::Closed)));

        let mut small = FrameReader::new(&one[..], 50);
        assert!(matches!(
            small.packet().await,
            Err(FrameError::TooLarge(..))
        ));
        let mut cut = FrameReader::new(&one[..10], 1024);
        assert!(matches!(cut.packet().await, Err(FrameError::Truncated)));

        // The protocol level of a CONNECT, without consuming it.
        let connect = encode(&Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("d")));
        let mut r = FrameReader::new(&connect[..], 1024);
        assert_eq!(r.peek_connect_level().await.unwrap(), Some(4));
        assert!(matches!(r.packet().await, Ok(Packet::Connect(_))));
        let mut r = FrameReader::new(&one[..], 1024);
        assert_eq!(r.peek_connect_level().await.unwrap(), None);
    }
}
