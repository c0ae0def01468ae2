#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tegmen_fuzz_targets::run("oci_config", data).expect("a known target"));
