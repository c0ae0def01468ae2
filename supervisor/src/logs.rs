//! `supervisor logs ID`: the host-side logs of a sandbox — QEMU's or the
//! builtin monitor's, and each vhost-user backend's, the `*.log` files of
//! its directory (the guest's console is `supervisor console`) — merged in
//! time order.
//!
//! Tegmen's own processes log through env_logger with microsecond UTC
//! times (`[2026-12-02T17:30:00.123456Z INFO ] …`), QEMU is started with
//! `-msg timestamp=on` (`2026-12-02T17:30:00.123456Z qemu-system-x86_64: …`).
//! A line without a time (a continuation, a panic's backtrace) keeps the
//! time of the line before it in its file, so it stays beside it; leading
//! lines without one take the sandbox's creation time.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::runtime::log::{parse_rfc3339_utc, rfc3339};
use crate::sandbox::Layout;
use crate::{Error, Result};

/// The end of each log file that is read: older lines are left out (and
/// one line says so).
pub const MAX_LOG_BYTES: u64 = 4 << 20;

/// One line of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// Fixed-width RFC 3339 UTC with microseconds, so text sorts as time.
    pub time: String,
    /// The file it came from, without `.log`: `qemu`, `vmm`,
    /// `vsock-backend`, `fs-backend`, `net0-backend`, ...
    pub source: String,
    /// The line without its time: `INFO message`, `qemu-system-x86_64: …`.
    pub line: String,
    #[serde(skip)]
    key: (i64, u32),
}

fn fixed_time(secs: i64, nanos: u32) -> String {
    let whole = rfc3339(secs, 0);
    format!("{}.{:06}Z", whole.trim_end_matches('Z'), nanos / 1000)
}

/// The time at the start of `line` and the rest: env_logger's
/// `[TIME LEVEL] message` as `LEVEL message`, or `TIME rest` as `rest`.
fn split_time(line: &str) -> Option<((i64, u32), String)> {
    if let Some(inner) = line.strip_prefix('[') {
        let (secs, nanos, used) = parse_rfc3339_utc(inner)?;
        let rest = &inner[used..];
        let (level, message) = rest.split_once(']')?;
        let level = level.split_whitespace().collect::<Vec<_>>().join(" ");
        return Some(((secs, nanos), format!("{level} {}", message.trim_start())));
    }
    let (secs, nanos, used) = parse_rfc3339_utc(line)?;
    Some(((secs, nanos), line[used..].trim_start().to_string()))
}

/// The lines of one log's text, each with its time (`start` for leading
/// untimed lines).
fn parse_log(source: &str, text: &str, start: (i64, u32)) -> Vec<LogLine> {
    let mut last = start;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let line = match split_time(l) {
                Some((key, rest)) => {
                    last = key;
                    rest
                }
                None => l.to_string(),
            };
            LogLine {
                time: fixed_time(last.0, last.1),
                source: source.to_string(),
                line,
                key: last,
            }
        })
        .collect()
}

/// The last [`MAX_LOG_BYTES`] of `path` as text, from a line's start;
/// true when something before was left out.
fn read_tail(path: &Path) -> Result<(String, bool)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let len = file.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    let cut = len > MAX_LOG_BYTES;
    if cut {
        file.seek(SeekFrom::Start(len - MAX_LOG_BYTES))
            .map_err(|e| Error::io("reading", path, e))?;
    }
    let mut bytes = Vec::new();
    file.take(MAX_LOG_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("reading", path, e))?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if cut {
        // The first line is likely a part of one.
        text = text
            .split_once('\n')
            .map_or(String::new(), |(_, rest)| rest.to_string());
    }
    Ok((text, cut))
}

/// Every host log of sandbox `id`, merged in time order (stable: lines of
/// one time keep their order within a file, files in name order).
pub fn logs(config: &Config, id: &str) -> Result<Vec<LogLine>> {
    let state = crate::inspect::state_of(config, id)?;
    let dir = Layout::new(config, id).dir;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io("reading", &dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log") && p.file_stem().is_some_and(|s| s != "console"))
        .collect();
    files.sort();
    let start = (i64::try_from(state.created).unwrap_or(0), 0);
    let mut all = Vec::new();
    for path in files {
        let source = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (text, cut) = match read_tail(&path) {
            Ok(t) => t,
            // Removed in the meantime (the sandbox is going).
            Err(_) if !path.exists() => continue,
            Err(e) => return Err(e),
        };
        let mut lines = parse_log(&source, &text, start);
        if cut {
            let key = lines.first().map_or(start, |l| l.key);
            lines.insert(
                0,
                LogLine {
                    time: fixed_time(key.0, key.1),
                    source: source.clone(),
                    line: format!(
                        "(earlier lines of {source}.log left out: only its last {MAX_LOG_BYTES} bytes are read)"
                    ),
                    key,
                },
            );
        }
        all.extend(lines);
    }
    all.sort_by_key(|l| l.key);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_env_logger_and_qemu_lines_are_read() {
        let (key, rest) = split_time("[2026-12-02T17:30:00.123456Z INFO ] vsock backend ready").unwrap();
        assert_eq!(
            (key, rest.as_str()),
            ((1_796_232_600, 123_456_000), "INFO vsock backend ready")
        );
        let (_, rest) = split_time("[2026-12-02T17:30:00Z WARN  tegmen_vmm] x] y").unwrap();
        assert_eq!(rest, "WARN tegmen_vmm x] y");
        let (key, rest) = split_time("2026-12-02T17:30:01.5Z qemu-system-x86_64: terminating on signal 15").unwrap();
        assert_eq!(
            (key, rest.as_str()),
            (
                (1_796_232_601, 500_000_000),
                "qemu-system-x86_64: terminating on signal 15"
            )
        );
        assert_eq!(split_time("thread 'main' panicked at src/x.rs"), None);
        assert_eq!(split_time("[not a time] x"), None);
    }

    #[test]
    fn untimed_lines_stay_with_the_line_before_and_files_merge_in_time_order() {
        let start = (1_796_232_000, 0);
        let a = parse_log(
            "fs-backend",
            "early untimed\n[2026-12-02T17:30:02.000000Z INFO ] b2\n  continued\n\n[2026-12-02T17:30:04.000000Z INFO ] b4\n",
            start,
        );
        let q = parse_log(
            "qemu",
            "2026-12-02T17:30:01.000000Z qemu: q1\n2026-12-02T17:30:03.000000Z qemu: q3\n",
            start,
        );
        assert_eq!(a[0].key, start);
        assert_eq!(a[2].time, "2026-12-02T17:30:02.000000Z");
        let mut all: Vec<LogLine> = a.into_iter().chain(q).collect();
        all.sort_by_key(|l| l.key);
        let order: Vec<&str> = all.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(
            order,
            [
                "early untimed",
                "qemu: q1",
                "INFO b2",
                "  continued",
                "qemu: q3",
                "INFO b4"
            ]
        );
    }

    #[test]
    fn a_long_log_is_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let line = "[2026-12-02T17:30:00.000000Z INFO ] 0123456789abcdef\n";
        let n = (MAX_LOG_BYTES as usize / line.len()) + 100;
        std::fs::write(&path, line.repeat(n)).unwrap();
        let (text, cut) = read_tail(&path).unwrap();
        assert!(cut);
        assert!(text.len() as u64 <= MAX_LOG_BYTES);
        assert!(text.lines().all(|l| l == line.trim_end()), "only whole lines");
        std::fs::write(&path, line).unwrap();
        assert_eq!(read_tail(&path).unwrap(), (line.to_string(), false));
    }
}
