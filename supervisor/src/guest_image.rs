//! Finding and checking the guest image: the uncompressed ELF `vmlinux` and
//! the initramfs built by `guest-image/build.sh`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// ELF machine number of x86-64.
const EM_X86_64: u16 = 62;

impl GuestImage {
    /// The image named by the configuration (or `TEGMEN_KERNEL` /
    /// `TEGMEN_INITRAMFS`), else the first directory of: `$TEGMEN_GUEST_DIR`,
    /// the source tree's `build/guest` above the running executable,
    /// `/usr/share/tegmen`; then checked.
    pub fn resolve(config: &Config) -> Result<GuestImage> {
        let env_path = |k: &str| std::env::var_os(k).map(PathBuf::from);
        let dir = default_dir();
        let kernel = config
            .guest
            .kernel
            .clone()
            .or_else(|| env_path("TEGMEN_KERNEL"))
            .unwrap_or_else(|| dir.join("vmlinux"));
        let initramfs = config
            .guest
            .initramfs
            .clone()
            .or_else(|| env_path("TEGMEN_INITRAMFS"))
            .unwrap_or_else(|| dir.join("initramfs.cpio.gz"));
        let image = GuestImage { kernel, initramfs };
        image.check()?;
        Ok(image)
    }

    /// Fails naming the file if the kernel is not an x86-64 ELF or the
    /// initramfs is neither a gzip nor a newc cpio archive.
    pub fn check(&self) -> Result<()> {
        let head = read_head(&self.kernel, "kernel")?;
        if head.len() < 20 || &head[..4] != b"\x7fELF" {
            return Err(Error::GuestImage(format!(
                "kernel {}: not an ELF vmlinux (bad magic)",
                self.kernel.display()
            )));
        }
        if head[4] != 2 || u16::from_le_bytes([head[18], head[19]]) != EM_X86_64 {
            return Err(Error::GuestImage(format!(
                "kernel {}: not a 64-bit x86-64 ELF",
                self.kernel.display()
            )));
        }
        let head = read_head(&self.initramfs, "initramfs")?;
        let gzip = head.len() >= 2 && head[..2] == [0x1f, 0x8b];
        let cpio = head.len() >= 6 && (&head[..6] == b"070701" || &head[..6] == b"070702");
        if !gzip && !cpio {
            return Err(Error::GuestImage(format!(
                "initramfs {}: neither a gzip nor a cpio (newc) archive",
                self.initramfs.display()
            )));
        }
        Ok(())
    }
}

fn read_head(path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        Error::GuestImage(format!(
            "{what} {}: {e} (build it with `make guest-image`)",
            path.display()
        ))
    })?;
    let mut head = vec![0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::GuestImage(format!("{what} {}: {e}", path.display()))),
        }
    }
    head.truncate(n);
    if head.is_empty() {
        return Err(Error::GuestImage(format!("{what} {}: file is empty", path.display())));
    }
    Ok(head)
}

fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TEGMEN_GUEST_DIR") {
        return dir.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        // <repo>/target/<profile>[/deps]/<exe>: look for <repo>/build/guest.
        for dir in exe.ancestors().skip(1).take(5) {
            let candidate = dir.join("build/guest");
            if candidate.join("vmlinux").exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/share/tegmen")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, kernel: &[u8], initramfs: &[u8]) -> GuestImage {
        let k = dir.join("vmlinux");
        let i = dir.join("initramfs.cpio.gz");
        std::fs::write(&k, kernel).unwrap();
        std::fs::write(&i, initramfs).unwrap();
        GuestImage {
            kernel: k,
            initramfs: i,
        }
    }

    fn elf64_x86() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h
    }

    #[test]
    fn a_good_image_passes() {
        let d = tempfile::tempdir().unwrap();
        image(d.path(), &elf64_x86(), &[0x1f, 0x8b, 8, 0]).check().unwrap();
        image(d.path(), &elf64_x86(), b"070701000").check().unwrap();
    }

    #[test]
    fn corrupt_or_missing_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = image(d.path(), b"MZ not an elf at all....", &[0x1f, 0x8b])
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmlinux") && e.contains("not an ELF"), "{e}");
        let mut arm = elf64_x86();
        arm[18] = 183;
        let e = image(d.path(), &arm, &[0x1f, 0x8b]).check().unwrap_err().to_string();
        assert!(e.contains("x86-64"), "{e}");
        let e = image(d.path(), &elf64_x86(), b"junkjunk")
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("initramfs") && e.contains("neither"), "{e}");
        let e = image(d.path(), &elf64_x86(), b"").check().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let missing = GuestImage {
            kernel: d.path().join("none"),
            initramfs: d.path().join("none"),
        };
        let e = missing.check().unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("none"), "{e}");
    }
}
