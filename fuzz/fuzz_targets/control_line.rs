//! libFuzzer entry for `control_line`; what it checks is in `tmem_fuzz::control_line`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tmem_fuzz::control_line::run(data);
});
