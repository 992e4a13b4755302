//! vhost-user payloads from the input through every payload parser: never a panic.
#![no_main]

use curve_vhost_user_blk::fuzzing::messages;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| messages(data));
