//! libFuzzer entry for `store_ops`; what it checks is in `tmem_fuzz::store_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tmem_fuzz::store_ops::run(data);
});
