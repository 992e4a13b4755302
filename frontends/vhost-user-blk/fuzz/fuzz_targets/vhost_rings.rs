#![no_main]
//! Split rings in real (memfd) guest memory: random avail entries, direct chains and indirect
//! tables walked and parsed as a queue worker does.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| curve_vhost_user_blk::fuzzing::rings(data));
