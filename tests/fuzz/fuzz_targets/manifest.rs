//! Fuzz target `manifest`: see `hyperty_tests::fuzz::manifest`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hyperty_tests::fuzz::manifest(data));
