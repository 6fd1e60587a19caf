//! Arbitrary bytes through the YAML loader and the analysis behind `weft analyze`: neither may
//! panic, whatever a file holds. (Under libFuzzer a panic aborts before the loader's own
//! `catch_unwind` guard can hide it, so parser panics are found too.)

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_config::{analyze, load_yaml_bytes, DecodeOptions};

fuzz_target!(|data: &[u8]| {
    let docs = load_yaml_bytes(data, "fuzz.yaml", &DecodeOptions::default());
    for finding in analyze(&docs) {
        let _ = finding.to_string();
    }
});
