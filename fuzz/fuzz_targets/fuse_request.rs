#![no_main]
libfuzzer_sys::fuzz_target!(init: tegmen_fuzz_targets::fs::init(), |data: &[u8]| tegmen_fuzz_targets::run("fuse_request", data).expect("a known target"));
