#![no_main]
//! The kernel's generic netlink answers (NBD family, controller) fed arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| curve_nbd::fuzzing::netlink_replies(data));
