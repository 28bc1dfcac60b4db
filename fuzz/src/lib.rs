//! Fuzzing the gate's input handling: what a device can send before and after TLS.
//!
//! The issue this answers: malformed frames, lengths that lie, truncated TLS records and bad
//! UTF-8 in topics must end the connection with a reason, never panic and never leak. Each
//! target in `fuzz_targets/` is a thin wrapper around one harness here:
//!
//! | target | harness | what it feeds |
//! |---|---|---|
//! | `packets` | [`gate::device_stream`] | the bytes a device sends after the handshake, through the gate's `FrameReader`, CONNECT admission, the topic ACL and re-encoding of everything the gate forwards |
//! | `tls` | [`tls::handshake`] | the bytes a device sends from the TCP accept on, into a rustls server configured by `Pki::gate_tls_config` |
//! | `certificate` | [`certificate`] | a DER certificate into `pki::peer_identity` |
//! | `telemetry` | [`telemetry`] | a telemetry payload into `telemetry::decode_json` |
//!
//! `packets` and `tls` read their first input byte as the size of each socket read (0: all at
//! once), so the fuzzer also explores how packets and records are split across reads.
//!
//! Besides "no panic, no leak" (libFuzzer with AddressSanitizer and LeakSanitizer), the
//! harnesses assert properties that must hold for every input; see each function.
//!
//! Seeds: `seeds/<target>/` holds a few valid and almost-valid inputs (a whole device session,
//! a TLS 1.2 client flight with a device certificate, ...). They are written by
//! `cargo test -- --ignored write_seeds` and checked by `cargo test` (both in `fuzz/`, with
//! `RUSTC_BOOTSTRAP=1` not needed). Pass them to a run as a second corpus directory:
//! `cargo fuzz run packets fuzz/corpus/packets fuzz/seeds/packets`; libFuzzer reads every
//! directory given and writes new inputs only to the first.
//!
//! Until the broker exposes its reader for fuzzing, [`frames`] is a copy of
//! `broker/src/gate/frames.rs`; the rest calls the Tellus crates themselves.

pub mod frames;
pub mod gate;
pub mod tls;

#[cfg(test)]
mod seeds;

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tellus_broker::pki;
use tellus_core::telemetry::{self, MAX_METRIC_LEN};
use tokio::io::{AsyncRead, ReadBuf};

/// Splits a fuzz input into the size of each socket read (its first byte; 0 or a missing
/// byte mean "everything at once") and the bytes the device sends.
pub fn split_reads(input: &[u8]) -> (usize, &[u8]) {
    match input.split_first() {
        Some((&0, rest)) => (usize::MAX, rest),
        Some((&n, rest)) => (n as usize, rest),
        None => (usize::MAX, input),
    }
}

/// A socket that delivers `data` in reads of at most `read_size` bytes, then end of stream.
/// Always ready, so a future reading it completes under `futures::executor::block_on`.
pub struct Chunked<'a> {
    data: &'a [u8],
    read_size: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], read_size: usize) -> Self {
        Chunked {
            data,
            read_size: read_size.max(1),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.read_size.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// `pki::peer_identity` on any bytes: an error or an identity whose serial is lower-case hex.
/// (The device id is a `DeviceId`, so it is valid by construction.)
pub fn certificate(der: &[u8]) {
    if let Ok(identity) = pki::peer_identity(der) {
        let serial = &identity.serial_hex;
        assert!(
            serial.len() % 2 == 0
                && serial
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "serial {serial:?} is not lower-case hex"
        );
    }
}

/// `telemetry::decode_json` on any bytes. When it accepts a payload: at least one sample,
/// every metric name non-empty, at most `MAX_METRIC_LEN` bytes and without empty dotted
/// parts, device times not negative, and the server clock read at most once per sample.
pub fn telemetry(payload: &[u8]) {
    const SERVER_TIME: i64 = 1_700_000_000_000;
    let mut reads = 0i64;
    let decoded = telemetry::decode_json(payload, &mut || {
        reads += 1;
        SERVER_TIME + reads
    });
    let Ok(samples) = decoded else { return };
    assert!(!samples.is_empty(), "accepted a payload with no samples");
    assert!(
        reads as usize <= samples.len(),
        "read the server clock {reads} times for {} samples",
        samples.len()
    );
    for s in &samples {
        assert!(
            !s.metric.is_empty()
                && s.metric.len() <= MAX_METRIC_LEN
                && s.metric.split('.').all(|part| !part.is_empty()),
            "bad metric name {:?}",
            s.metric
        );
        assert!(s.ts_ms >= 0, "negative timestamp {}", s.ts_ms);
    }
}
