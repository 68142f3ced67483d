//! libFuzzer entry for `device_chain`; what it checks is in `tmem_fuzz::device_chain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tmem_fuzz::device_chain::run(data);
});
