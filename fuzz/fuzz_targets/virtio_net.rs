#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tegmen_fuzz_targets::run("virtio_net", data).expect("a known target"));
