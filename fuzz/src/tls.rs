//! What a device sends from the TCP accept on, into the gate's TLS server (the `tls` target).
//!
//! The server is a rustls `ServerConnection` with the gate's own configuration
//! (`Pki::gate_tls_config`: TLS 1.2 and 1.3, client certificate required). Its fleet CA is
//! made from a fixed key, [`FUZZ_CA_KEY`], so that a recorded client flight (the seeds in
//! `seeds/tls/`) still chains to it in every fuzzing process: with TLS 1.2 the client's
//! Certificate and ClientKeyExchange travel in the clear, so the fuzzer reaches the client
//! certificate verifier and the key exchange, not only the ClientHello and the record layer.
//!
//! The property: every input ends the handshake with an error (the gate logs it and counts
//! `handshake_failed`), or with the stream ending mid-handshake (the gate's handshake
//! deadline); never a panic, a leak or an unbounded buffer.

use std::{
    io::{self, Read},
    sync::{Arc, OnceLock},
    time::Duration,
};

use rustls::{ServerConfig, ServerConnection};
use tellus_broker::pki::Pki;

use crate::split_reads;

/// The private key of the fuzzing fleet CA: an ECDSA P-256 key made for these fuzz targets
/// and used nowhere else. It is public on purpose, so the seeds can be recorded against it.
pub const FUZZ_CA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp7wdWOPtpEkycUYS
WIvuumez6kupvzj7qK/db4nb6oKhRANCAAR4TF6lYjjM1wh+CG9kf7JLqSpJxaEf
ubrRCTp9kxbS0cjklNoRuRq6OcQF554P9zZAsnoxt9svUA6p692HkMda
-----END PRIVATE KEY-----
";

/// Validity of the device certificates the seeds carry.
const DEVICE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The gate's TLS configuration and the CA behind it, made once per process.
pub struct Fixture {
    pub pki: Pki,
    pub config: Arc<ServerConfig>,
}

/// The fixture of this process. Its files live in a temporary directory only while it is
/// made; afterwards everything is in memory.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory for the fuzz CA");
        std::fs::write(dir.path().join("ca.key"), FUZZ_CA_KEY).expect("writing the fuzz CA key");
        let pki = Pki::load_or_create(dir.path(), DEVICE_VALIDITY).expect("the fuzz CA loads");
        let (chain, key) = pki
            .server_identity(dir.path(), &[])
            .expect("a server certificate from the fuzz CA");
        let config = Arc::new(
            pki.gate_tls_config(chain, key, &[])
                .expect("the gate's TLS configuration"),
        );
        Fixture { pki, config }
    })
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Handshake {
    /// rustls refused the input; the gate logs this and closes the connection.
    Failed(rustls::Error),
    /// The input ended first; the gate's handshake deadline closes the connection.
    Ended { handshaking: bool },
    /// rustls stopped reading (backpressure), which the gate also turns into an error.
    Io(io::Error),
}

/// Feeds a fuzz input (see [`split_reads`]) to a fresh gate TLS server.
pub fn handshake(input: &[u8]) -> Handshake {
    let (read_size, bytes) = split_reads(input);
    let mut conn = ServerConnection::new(fixture().config.clone()).expect("a server connection");
    let mut socket = Socket {
        data: bytes,
        read_size: read_size.max(1),
    };
    let mut plaintext = [0u8; 4096];
    loop {
        match conn.read_tls(&mut socket) {
            Ok(0) => {
                return Handshake::Ended {
                    handshaking: conn.is_handshaking(),
                }
            }
            Ok(_) => {}
            Err(e) => return Handshake::Io(e),
        }
        let state = conn.process_new_packets();
        // What the gate would send back: handshake messages, or the alert before closing.
        while conn.wants_write() {
            conn.write_tls(&mut io::sink())
                .expect("a sink takes everything");
        }
        if let Err(e) = state {
            return Handshake::Failed(e);
        }
        while let Ok(n) = conn.reader().read(&mut plaintext) {
            if n == 0 {
                break;
            }
        }
    }
}

/// A socket that delivers `data` in reads of at most `read_size` bytes, then end of stream.
struct Socket<'a> {
    data: &'a [u8],
    read_size: usize,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_size.min(self.data.len()).min(buf.len());
        let (head, tail) = self.data.split_at(n);
        buf[..n].copy_from_slice(head);
        self.data = tail;
        Ok(n)
    }
}
