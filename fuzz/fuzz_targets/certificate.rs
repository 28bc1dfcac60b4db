//! A client certificate (DER) into `pki::peer_identity`, which names the device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    tellus_fuzz::certificate(der);
});
