#![no_main]
//! Raft log entries and the raft RPCs between chunkservers (protobuf) fed arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| curve_chunkserver::codec::fuzz_raft_messages(data));
