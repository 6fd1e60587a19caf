//! Arbitrary bytes as a request head through the waypoint's security stage's parsers: the JWT
//! extraction and decoding (`waypoint::jwt::fuzz_request_head`) and the path normalisation
//! authorization policies match on (`waypoint::authz::normalize_path_bytes`). None of it may
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    waypoint::jwt::fuzz_request_head(data);
    let _ = waypoint::authz::normalize_path_bytes(data);
});
