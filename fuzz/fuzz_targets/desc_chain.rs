#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tegmen_fuzz_targets::run("desc_chain", data).expect("a known target"));
