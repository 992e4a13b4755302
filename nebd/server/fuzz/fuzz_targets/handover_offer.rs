#![no_main]
//! The live-upgrade offer (and answer) of a hand-over, fed arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nebd_server::handover::fuzz_offer(data));
