//! Fuzz target `policies`: see `hyperty_tests::fuzz::policies`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hyperty_tests::fuzz::policies(data));
