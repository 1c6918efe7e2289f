//! Fuzz target `patch`: see `hyperty_tests::fuzz::patch`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hyperty_tests::fuzz::patch(data);
});
