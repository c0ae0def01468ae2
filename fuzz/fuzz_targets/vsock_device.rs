#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tegmen_fuzz_targets::run("vsock_device", data).expect("a known target"));
