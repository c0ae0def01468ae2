//! The bodies of Tegmen's fuzz targets, one per parser that takes input
//! from a guest or a user (issue 12). `fuzz/` wraps each in a libFuzzer
//! target for `make fuzz`; `tests/corpus.rs` runs every checked-in seed and
//! every crash input ever found through the same functions in `make test`.
//!
//! A target never trusts what it drives to be right: besides "no panic"
//! it checks what the code promises (bounds kept, nothing outside a share
//! changed, no file descriptor leaked, only negotiated offloads reaching
//! the tap).

pub mod chain;
pub mod fs;
pub mod guest;
pub mod host;
pub mod input;
pub mod mmio;
pub mod net;
pub mod vsock;

/// A target: any bytes in, a panic when something it checks is wrong.
pub type Target = fn(&[u8]);

/// Every target by the name of its `fuzz/fuzz_targets/<name>.rs` and its
/// corpus directories.
pub const TARGETS: &[(&str, Target)] = &[
    ("vsock_packet", vsock::packet),
    ("vsock_device", vsock::device),
    ("fuse_request", fs::request),
    ("desc_chain", chain::walk),
    ("virtio_mmio", mmio::transport),
    ("virtio_net", net::device),
    ("stream_header", host::stream_header),
    ("agent_reply", host::agent_reply),
    ("oci_config", host::oci_config),
    ("config_toml", host::config_toml),
];

/// Runs target `name` on `data` (for the corpus runner and by hand).
pub fn run(name: &str, data: &[u8]) -> Result<(), String> {
    let (_, f) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| format!("no fuzz target {name:?}"))?;
    f(data);
    Ok(())
}
