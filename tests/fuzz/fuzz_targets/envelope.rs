//! Fuzz target `envelope`: see `hyperty_tests::fuzz::envelope`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hyperty_tests::fuzz::envelope(data);
});
