//! A device's bytes from the TCP accept on, into the gate's TLS server configuration.
//! Input: one byte for the size of each socket read (0: all at once), then the stream.
//! See `tellus_fuzz::tls`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // Make the CA and server certificate before the first input, not during it.
        tellus_fuzz::tls::fixture();
    },
    |input: &[u8]| {
        tellus_fuzz::tls::handshake(input);
    }
);
