#![no_main]
//! part1 <-> part2 frames fed arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nebd_proto::fuzz_frames(data));
