//! A device's byte stream after the TLS handshake, through the gate's reader, admission and
//! ACL. Input: one byte for the size of each socket read (0: all at once), then the stream.
//! See `tellus_fuzz::gate` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    tellus_fuzz::gate::device_stream(input);
});
