//! Configuration of the virtio-fs device and the layout of its virtio
//! config space.
//!
//! Everything a front end or an operator can set about the device lives in
//! [`FsConfig`], and is checked once by [`FsConfig::validate`] before a
//! device is built, so the request path never has to second-guess it. The
//! config space ([`VirtioFsConfigSpace`]) is the `struct virtio_fs_config`
//! of the virtio specification (5.11.4): a NUL-padded tag of at most 36
//! bytes followed by the number of request queues, little endian.

use std::path::PathBuf;
use std::time::Duration;

use super::FsError;

/// Tag the guest mounts (`mount -t virtiofs <tag> /mnt`) when none is given.
pub const DEFAULT_TAG: &str = "tegmen";

/// Longest tag the virtio-fs config space can carry, in bytes.
pub const TAG_MAX_LEN: usize = 36;

/// Index of the high-priority queue (FORGET, INTERRUPT); request queues
/// follow it.
pub const HIPRIO_QUEUE_INDEX: usize = 0;

/// Upper bound on request queues accepted in a configuration. The vhost-user
/// plumbing tracks queues in a 64-bit mask, and one slot is the hiprio queue.
pub const MAX_REQUEST_QUEUES: u16 = 63;

/// How much the guest may cache of what it has seen of the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// No caching: every access goes to the host, files are opened with
    /// direct I/O, entries and attributes expire at once. Host-side changes
    /// are seen immediately; shared writable mmap of files is unavailable.
    Never,
    /// Entries and attributes are cached for a second, file data is cached
    /// until the file is closed or its size/mtime changes.
    #[default]
    Auto,
    /// Everything is cached for a long time: only for shares nobody else
    /// modifies while the guest runs.
    Always,
}

impl CachePolicy {
    /// How long the guest may keep an entry or an attribute.
    pub fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }

    pub(crate) fn to_passthrough(self) -> fuse_backend_rs::passthrough::CachePolicy {
        use fuse_backend_rs::passthrough::CachePolicy as P;
        match self {
            CachePolicy::Never => P::Never,
            CachePolicy::Auto => P::Auto,
            CachePolicy::Always => P::Always,
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "none" => Ok(CachePolicy::Never),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            other => Err(format!(
                "unknown cache policy {other:?} (expected never, auto or always)"
            )),
        }
    }
}

impl std::fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CachePolicy::Never => "never",
            CachePolicy::Auto => "auto",
            CachePolicy::Always => "always",
        })
    }
}

/// What the device serves and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// Directory served as the root of the guest's file system, as the
    /// serving process sees it. A backend that has pivoted into the share
    /// (see [`super::sandbox`]) passes `/` here.
    pub shared_dir: PathBuf,
    /// Mount tag, at most [`TAG_MAX_LEN`] bytes, no NUL.
    pub tag: String,
    /// Number of request queues (the hiprio queue comes on top).
    pub num_request_queues: u16,
    /// Guest caching policy.
    pub cache: CachePolicy,
    /// Whether extended attributes are passed through (off by default).
    pub xattr: bool,
}

impl FsConfig {
    /// A configuration serving `shared_dir` with every other setting at its
    /// default: tag `tegmen`, one request queue, `auto` caching, no xattrs.
    pub fn new(shared_dir: impl Into<PathBuf>) -> Self {
        FsConfig {
            shared_dir: shared_dir.into(),
            tag: DEFAULT_TAG.to_string(),
            num_request_queues: 1,
            cache: CachePolicy::default(),
            xattr: false,
        }
    }

    /// Check every field; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<(), FsError> {
        validate_tag(&self.tag)?;
        if self.num_request_queues == 0 || self.num_request_queues > MAX_REQUEST_QUEUES {
            return Err(FsError::InvalidConfig(format!(
                "num_request_queues is {}, must be 1..={MAX_REQUEST_QUEUES}",
                self.num_request_queues
            )));
        }
        let dir = self.shared_dir.as_os_str();
        if dir.is_empty() {
            return Err(FsError::InvalidConfig("shared_dir is empty".into()));
        }
        if std::os::unix::ffi::OsStrExt::as_bytes(dir).contains(&0) {
            return Err(FsError::InvalidConfig(format!(
                "shared_dir {} contains a NUL byte",
                self.shared_dir.display()
            )));
        }
        match std::fs::metadata(&self.shared_dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(FsError::SharedDir {
                path: self.shared_dir.clone(),
                error: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            }),
            Err(error) => Err(FsError::SharedDir {
                path: self.shared_dir.clone(),
                error,
            }),
        }
    }

    /// Total number of virtqueues: hiprio plus the request queues.
    pub fn num_queues(&self) -> usize {
        1 + usize::from(self.num_request_queues)
    }

    /// The device's config space for this configuration.
    pub fn config_space(&self) -> VirtioFsConfigSpace {
        VirtioFsConfigSpace::new(&self.tag, u32::from(self.num_request_queues))
    }
}

/// Check a mount tag: 1 to 36 bytes, no NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() {
        return Err(FsError::InvalidConfig("tag is empty".into()));
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(FsError::InvalidConfig(format!(
            "tag {tag:?} is {} bytes long, the limit is {TAG_MAX_LEN}",
            tag.len()
        )));
    }
    if tag.as_bytes().contains(&0) {
        return Err(FsError::InvalidConfig(format!("tag {tag:?} contains a NUL byte")));
    }
    Ok(())
}

/// `struct virtio_fs_config`: what the driver reads from config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioFsConfigSpace {
    /// UTF-8 tag, NUL padded (not NUL terminated when it is 36 bytes).
    pub tag: [u8; TAG_MAX_LEN],
    /// Number of request queues.
    pub num_request_queues: u32,
}

impl VirtioFsConfigSpace {
    /// Size of the config space in bytes.
    pub const SIZE: usize = TAG_MAX_LEN + 4;

    /// Build the config space; a tag longer than the limit is cut (callers
    /// validate tags first, so this does not happen in practice).
    pub fn new(tag: &str, num_request_queues: u32) -> Self {
        let mut bytes = [0u8; TAG_MAX_LEN];
        let n = tag.len().min(TAG_MAX_LEN);
        bytes[..n].copy_from_slice(&tag.as_bytes()[..n]);
        VirtioFsConfigSpace {
            tag: bytes,
            num_request_queues,
        }
    }

    /// The wire form: tag bytes then `num_request_queues` as le32.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..TAG_MAX_LEN].copy_from_slice(&self.tag);
        out[TAG_MAX_LEN..].copy_from_slice(&self.num_request_queues.to_le_bytes());
        out
    }

    /// Read `size` bytes at `offset`, as a driver's config read does.
    /// `None` when the window falls outside the config space.
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        self.to_bytes().get(start..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_tag_limits() {
        assert!(validate_tag("tegmen").is_ok());
        assert!(validate_tag(&"a".repeat(36)).is_ok());
        assert!(validate_tag(&"a".repeat(37)).is_err());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("a\0b").is_err());
    }

    #[test]
    fn fs_config_validation_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FsConfig::new(dir.path());
        cfg.validate().unwrap();

        let missing = FsConfig::new(dir.path().join("nope"));
        let err = missing.validate().unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = FsConfig::new(&file).validate().unwrap_err().to_string();
        assert!(err.contains("Not a directory"), "{err}");

        let mut zero_queues = FsConfig::new(dir.path());
        zero_queues.num_request_queues = 0;
        assert!(zero_queues.validate().is_err());

        let mut long_tag = FsConfig::new(dir.path());
        long_tag.tag = "x".repeat(37);
        assert!(long_tag.validate().unwrap_err().to_string().contains("36"));
    }

    #[test]
    fn fs_config_space_layout() {
        let space = VirtioFsConfigSpace::new("tegmen", 1);
        let bytes = space.to_bytes();
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[..6], b"tegmen");
        assert!(bytes[6..36].iter().all(|&b| b == 0));
        assert_eq!(&bytes[36..], &1u32.to_le_bytes());
        assert_eq!(space.read(36, 4).unwrap(), 1u32.to_le_bytes().to_vec());
        assert_eq!(space.read(0, 40).unwrap(), bytes.to_vec());
        assert!(space.read(38, 4).is_none());
        assert!(space.read(u32::MAX, u32::MAX).is_none());
    }

    #[test]
    fn fs_cache_policy_parse() {
        assert_eq!("none".parse::<CachePolicy>().unwrap(), CachePolicy::Never);
        assert_eq!("auto".parse::<CachePolicy>().unwrap(), CachePolicy::Auto);
        assert!("sometimes".parse::<CachePolicy>().is_err());
        assert_eq!(CachePolicy::Never.timeout(), Duration::ZERO);
    }
}
