//! Facts about the guest, read from the kernel's own files, for
//! `GuestDetails`.

use std::path::Path;

use tegmen_agent_api::agent::Mount;

/// The longest sandbox id the agent accepts from the share; anything
/// longer is not an id the supervisor wrote.
const MAX_SANDBOX_ID_LEN: usize = 256;

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn memory_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo_total(&text).unwrap_or(0)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    parse_meminfo(text, "MemTotal:")
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn memory_available_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text, "MemAvailable:").unwrap_or(0)
}

fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The 1, 5 and 15 minute load averages of /proc/loadavg.
pub fn load_average() -> Vec<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> Vec<f64> {
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|w| w.parse().ok()).collect();
    if v.len() == 3 {
        v
    } else {
        Vec::new()
    }
}

pub fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

pub fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    parse_mounts(&text)
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let mut m = Mount::new();
            m.source = f.next()?.to_string();
            m.target = f.next()?.to_string();
            m.fstype = f.next()?.to_string();
            m.options = f.next().unwrap_or_default().to_string();
            Some(m)
        })
        .collect()
}

/// The sandbox id the supervisor wrote into the share before boot.
pub fn sandbox_id(shared_dir: &Path) -> Result<String, String> {
    let path = shared_dir.join(tegmen_agent_api::SANDBOX_ID_FILE);
    let raw = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if raw.len() > MAX_SANDBOX_ID_LEN {
        return Err(format!("{} is longer than {MAX_SANDBOX_ID_LEN} bytes", path.display()));
    }
    let id = String::from_utf8(raw).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    Ok(id.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_averages_are_three_or_none() {
        assert_eq!(parse_loadavg("0.52 0.25 0.10 2/61 123\n"), vec![0.52, 0.25, 0.10]);
        assert!(parse_loadavg("0.52 x 0.10").is_empty());
        assert!(parse_loadavg("").is_empty());
        assert_eq!(
            parse_meminfo("MemTotal: 2 kB\nMemAvailable: 1 kB\n", "MemAvailable:"),
            Some(1024)
        );
    }

    #[test]
    fn meminfo_total_is_parsed_in_bytes() {
        let text = "MemTotal:         246000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(246000 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn mounts_are_parsed_and_short_lines_skipped() {
        let text = "tegmen /run/tegmen/shared virtiofs rw,nosuid 0 0\nbroken line\n";
        let m = parse_mounts(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].source, "tegmen");
        assert_eq!(m[0].target, "/run/tegmen/shared");
        assert_eq!(m[0].fstype, "virtiofs");
    }

    #[test]
    fn sandbox_id_is_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(tegmen_agent_api::SANDBOX_ID_FILE);
        std::fs::write(&file, "abc\n").unwrap();
        assert_eq!(sandbox_id(dir.path()).unwrap(), "abc");
        std::fs::write(&file, "x".repeat(MAX_SANDBOX_ID_LEN + 1)).unwrap();
        assert!(sandbox_id(dir.path()).unwrap_err().contains("longer than"));
        std::fs::remove_file(&file).unwrap();
        assert!(sandbox_id(dir.path()).unwrap_err().contains("reading"));
    }
}
