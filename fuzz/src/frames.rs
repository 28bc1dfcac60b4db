//! A copy of the gate's device-side reader, `broker/src/gate/frames.rs` as of commit ef439e4,
//! until the broker exposes an entry point for fuzzing (see the crate docs).
//!
//! Everything below the line is that file unchanged except for its unit tests, which stay in
//! the broker. When `frames.rs` changes, copy it again, or better, replace this module with
//! the broker's own entry point.
//
// ---------------------------------------------------------------------------------------------
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
