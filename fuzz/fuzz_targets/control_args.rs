//! Control-plane command lines (the raw exec bytes of `ssh portcullis@bastion …`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = portcullis::control::parse(data);
});
