//! Fuzz target `assertion`: see `hyperty_tests::fuzz::assertion`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hyperty_tests::fuzz::assertion(data);
});
