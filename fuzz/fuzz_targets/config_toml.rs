#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tegmen_fuzz_targets::run("config_toml", data).expect("a known target"));
