//! ublk I/O descriptors from the input through the request parser: never a panic, and every
//! accepted request inside the device and its limits.
#![no_main]

use curve_ublk::fuzzing::descriptors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| descriptors(data));
