//! Fuzz target `guest_message`: see `hyperty_tests::fuzz::guest_message`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hyperty_tests::fuzz::guest_message(data);
});
