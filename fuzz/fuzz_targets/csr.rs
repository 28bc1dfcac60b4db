//! A certificate rotation request, as a device publishes it on `devices/{id}/certs/csr`, into
//! `Pki::sign_device_csr`. See `tellus_fuzz::csr` for the input's form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // Make the CA before the first input, not during it.
        tellus_fuzz::tls::fixture();
    },
    |input: &[u8]| {
        let _ = tellus_fuzz::csr(input);
    }
);
