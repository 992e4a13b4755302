#![no_main]
//! Transmission request parsing and validation fed arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| curve_nbd::fuzzing::requests(data));
