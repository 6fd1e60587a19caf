//! Arbitrary bytes as the first bytes of a waypoint stream: protocol detection, then the
//! request line and headers through path normalization and the routing decision
//! (`waypoint::fuzzing::request_head`). None of it may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| waypoint::fuzzing::request_head(data));
