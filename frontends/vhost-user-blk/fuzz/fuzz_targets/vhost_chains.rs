//! Descriptor chains built from the input, over a guest memory image also from the input,
//! through the request parser: never a panic, and every accepted request stays in bounds.
#![no_main]

use curve_vhost_user_blk::fuzzing::chains;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chains(data));
