//! Stored transcript batches: damaged ones are reported, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portcullis::record::decode_stored(data);
});
