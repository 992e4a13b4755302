#![no_main]
//! Fixed-newstyle negotiation fed arbitrary client bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| curve_nbd::fuzzing::negotiation(data));
