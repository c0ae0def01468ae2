//! OCI image archives built offline from a directory, for the clients that
//! only run images (`podman load`, `ctr images import`): one uncompressed
//! layer owned by root with fixed times, an image config, a manifest, and an
//! index naming the image for both containerd and podman.

use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// 2024-01-01: archives are reproducible, and no file is "from the future".
const MTIME: u64 = 1_704_067_200;

fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The layer: every file, directory and symlink below `rootfs`, in sorted
/// order, owned by 0:0.
fn layer(rootfs: &Path) -> std::io::Result<Vec<u8>> {
    let mut paths = Vec::new();
    collect(rootfs, rootfs, &mut paths)?;
    paths.sort();
    let mut b = tar::Builder::new(Vec::new());
    for rel in paths {
        let full = rootfs.join(&rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_ustar();
        h.set_metadata(&meta);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        if meta.file_type().is_symlink() {
            h.set_size(0);
            let target = std::fs::read_link(&full)?;
            b.append_link(&mut h, &rel, target)?;
        } else if meta.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, std::io::empty())?;
        } else {
            b.append_data(&mut h, &rel, std::fs::File::open(&full)?)?;
        }
    }
    b.into_inner()
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        out.push(path.strip_prefix(base).unwrap().to_path_buf());
        if entry.file_type()?.is_dir() {
            collect(base, &path, out)?;
        }
    }
    Ok(())
}

/// Writes `archive`: a plain tar of `rootfs` (for `docker import`).
pub fn write_rootfs_tar(rootfs: &Path, archive: &Path) -> std::io::Result<()> {
    std::fs::write(archive, layer(rootfs)?)
}

/// Writes `archive`: an OCI image layout (tar) of `rootfs` named `name`
/// (a full reference such as `docker.io/library/busybox:latest`), whose
/// default command is `cmd`.
pub fn write_oci_archive(rootfs: &Path, name: &str, cmd: &[&str], archive: &Path) -> std::io::Result<()> {
    let layer = layer(rootfs)?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer.len()}],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name,
            },
        }],
    }))?;

    let mut out = tar::Builder::new(std::fs::File::create(archive)?);
    let mut add = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_entry_type(tar::EntryType::Regular);
        out.append_data(&mut h, path, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        add(&format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]), blob)?;
    }
    out.into_inner()?.sync_all()
}
