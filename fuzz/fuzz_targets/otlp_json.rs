#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| toolsight::fuzzing::otlp_json(data));
