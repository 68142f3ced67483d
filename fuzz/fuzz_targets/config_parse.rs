//! libFuzzer entry for `config_parse`; what it checks is in `tmem_fuzz::config_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tmem_fuzz::config_parse::run(data);
});
