//! A telemetry payload into `telemetry::decode_json` and `decode_protobuf`, as ingest decodes
//! it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    tellus_fuzz::telemetry(payload);
});
