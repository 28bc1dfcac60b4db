//! Fuzzing the gate's input handling: what a device can send before and after TLS.
//!
//! The issue this answers: malformed frames, lengths that lie, truncated TLS records and bad
//! UTF-8 in topics must end the connection with a reason, never panic and never leak. Each
//! target in `fuzz_targets/` is a thin wrapper around one harness here:
//!
//! | target | harness | what it feeds |
//! |---|---|---|
//! | `packets` | [`gate::device_stream`] | the bytes a device sends after the handshake, in MQTT 3.1.1 or 5 as its CONNECT says, through the gate's `FrameReader` and codec, CONNECT admission, the topic ACL and topic aliases, and the encoding of everything the gate forwards or answers |
//! | `tls` | [`tls::handshake`] | the bytes a device sends from the TCP accept on, into a rustls server configured by `Pki::gate_tls_config` |
//! | `certificate` | [`certificate`] | a DER certificate into `pki::peer_identity` |
//! | `csr` | [`csr`] | a certificate rotation request (`devices/{id}/certs/csr`) into `Pki::sign_device_csr` |
//! | `telemetry` | [`telemetry()`] | a telemetry payload into `telemetry::decode_json` and `decode_protobuf` |
//!
//! `packets` and `tls` read their first input byte as the size of each socket read (0: all at
//! once), so the fuzzer also explores how packets and records are split across reads.
//!
//! Besides "no panic, no leak" (libFuzzer with AddressSanitizer and LeakSanitizer), the
//! harnesses assert properties that must hold for every input; see each function.
//!
//! Seeds: `seeds/<target>/` holds a few valid and almost-valid inputs (a whole device session
//! in MQTT 3.1.1 and in MQTT 5, a TLS 1.2 client flight with a device certificate, ...). They
//! are written by `cargo test -- --ignored write_seeds` and checked by `cargo test` (both in
//! `fuzz/`, without `RUSTC_BOOTSTRAP=1`). Pass them to a run as a second corpus directory, after the one that
//! collects the corpus (libFuzzer reads every directory given, writes new inputs only to the
//! first, and refuses one that does not exist), from the repository root:
//!
//! ```sh
//! mkdir -p fuzz/corpus/packets
//! RUSTC_BOOTSTRAP=1 cargo fuzz run packets fuzz/corpus/packets fuzz/seeds/packets -- \
//!     -max_total_time=600 -rss_limit_mb=2048
//! ```
//!
//! The gate's own frame reader is driven through `tellus_broker::gate::fuzz_packets` and
//! `fuzz_frames`, and its MQTT codec through `tellus_broker::gate::codec`; everything else
//! calls the Tellus crates themselves.

pub mod gate;
pub mod tls;

#[cfg(test)]
mod seeds;

use rustls::pki_types::{pem::PemObject, CertificateDer};
use tellus_broker::pki;
use tellus_core::{
    telemetry::{self, MAX_METRIC_LEN},
    DeviceId,
};

/// Splits a fuzz input into the size of each socket read (its first byte; 0 or a missing
/// byte mean "everything at once") and the bytes the device sends.
pub fn split_reads(input: &[u8]) -> (usize, &[u8]) {
    match input.split_first() {
        Some((&0, rest)) => (usize::MAX, rest),
        Some((&n, rest)) => (n as usize, rest),
        None => (usize::MAX, input),
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

/// `Pki::sign_device_csr`, which a device reaches by publishing on `devices/{id}/certs/csr`
/// (certificate rotation). The first byte chooses the form of the rest: even, the payload as
/// the device sent it (the gate refuses one that is not UTF-8 before the PKI sees it); odd,
/// DER that the harness wraps in a PEM block, so the fuzzer works on the PKCS#10 parser. When a
/// certificate is issued it names the device that asked, whatever the request's subject says.
/// Returns whether one was issued.
pub fn csr(input: &[u8]) -> bool {
    let Some((&form, rest)) = input.split_first() else {
        return false;
    };
    let wrapped;
    let text = if form % 2 == 0 {
        match std::str::from_utf8(rest) {
            Ok(text) => text,
            Err(_) => return false,
        }
    } else {
        wrapped = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest));
        wrapped.as_str()
    };
    let device = DeviceId::parse(gate::DEVICE).expect("DEVICE is a valid device id");
    let Ok(issued) = tls::fixture().pki.sign_device_csr(&device, text) else {
        return false;
    };
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .expect("an issued certificate is PEM");
    let identity = pki::peer_identity(&der).expect("an issued certificate names a device");
    assert_eq!(identity.device, device, "a CSR chose its device");
    assert_eq!(identity.serial_hex, issued.serial_hex);
    true
}

/// `telemetry::decode_json` and `telemetry::decode_protobuf` on any bytes (ingest decodes
/// `telemetry` and `telemetry/pb` payloads with them). When one accepts a payload: at least
/// one sample, every metric name non-empty, at most `MAX_METRIC_LEN` bytes and without empty
/// dotted parts, device times not negative, and floats finite; a protobuf batch also has
/// each (metric, time) once, and reads the server clock at most once. (JSON reads the clock
/// once per object without a device time, as documented, even for an object that yields no
/// sample, such as `{"a": {}}` beside others: so there is no bound on reads to check.)
pub fn telemetry(payload: &[u8]) {
    let mut now = 1_700_000_000_000;
    let json = telemetry::decode_json(payload, &mut || {
        now += 1;
        now
    });
    let mut reads = 0;
    let protobuf = telemetry::decode_protobuf(payload, &mut || {
        reads += 1;
        1_700_000_000_000
    });
    if let Ok(samples) = &protobuf {
        assert!(reads <= 1, "the server clock was read {reads} times");
        let mut seen = std::collections::HashSet::new();
        for s in samples {
            assert!(
                seen.insert((&s.metric, s.ts_ms)),
                "{} twice at {}",
                s.metric,
                s.ts_ms
            );
        }
    }
    for samples in [json, protobuf].into_iter().flatten() {
        assert!(!samples.is_empty(), "accepted a payload with no samples");
        for s in &samples {
            assert!(
                !s.metric.is_empty()
                    && s.metric.len() <= MAX_METRIC_LEN
                    && s.metric.split('.').all(|part| !part.is_empty()),
                "bad metric name {:?}",
                s.metric
            );
            assert!(s.ts_ms >= 0, "negative timestamp {}", s.ts_ms);
            if let tellus_core::Value::Float(f) = s.value {
                assert!(f.is_finite(), "{} is {f}", s.metric);
            }
        }
    }
}
