//! runc's `--log FILE`, `--log-format text|json` and `--debug`: one line per
//! message, `time="…" level=error msg="…"` or `{"level":"error","msg":"…",
//! "time":"…"}`, so containerd can read the last error from the file. Errors
//! also go to stderr (plain text) from the binary.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

struct Logger {
    file: Option<Mutex<File>>,
    format: Format,
    debug: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Sets up logging once per process; a log file that cannot be opened is
/// reported on stderr and otherwise ignored.
pub fn init(path: Option<&Path>, format: Format, debug: bool) {
    let file = path.and_then(
        |p| match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                eprintln!("tegmen: opening log file {}: {e}", p.display());
                None
            }
        },
    );
    let _ = LOGGER.set(Logger { file, format, debug });
}

/// True when `--debug` was given.
pub fn debug_enabled() -> bool {
    LOGGER.get().is_some_and(|l| l.debug)
}

pub fn error(msg: &str) {
    write("error", msg);
}

pub fn warn(msg: &str) {
    write("warning", msg);
}

pub fn info(msg: &str) {
    write("info", msg);
}

pub fn debug(msg: &str) {
    if debug_enabled() {
        write("debug", msg);
    }
}

/// With `--debug`: how long one phase of a command took, as `phase NAME:
/// MS ms` (`make bench` reads these for its breakdown).
pub fn phase(name: &str, took: std::time::Duration) {
    debug(&format!("phase {name}: {:.1} ms", took.as_secs_f64() * 1000.0));
}

fn write(level: &str, msg: &str) {
    let Some(logger) = LOGGER.get() else { return };
    let Some(file) = &logger.file else { return };
    let line = format_line(logger.format, level, msg, &rfc3339_now(false));
    if let Ok(mut f) = file.lock() {
        let _ = f.write_all(line.as_bytes());
    }
}

fn format_line(format: Format, level: &str, msg: &str, time: &str) -> String {
    match format {
        Format::Json => {
            let v = serde_json::json!({"level": level, "msg": msg, "time": time});
            format!("{v}\n")
        }
        Format::Text => {
            let quoted = serde_json::to_string(msg).unwrap_or_default();
            format!("time=\"{time}\" level={level} msg={quoted}\n")
        }
    }
}

/// Now, as RFC 3339 in UTC (`…Z`), with nanoseconds when `nanos`.
pub fn rfc3339_now(nanos: bool) -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(d.as_secs() as i64, if nanos { d.subsec_nanos() } else { 0 })
}

/// Seconds and nanoseconds since the epoch as Go's `time.RFC3339Nano` writes
/// them in UTC: trailing zeros of the fraction dropped.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The inverse of [`civil_from_days`] (Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Reads a UTC time `YYYY-MM-DDTHH:MM:SS[.fraction]Z` at the start of
/// `text`: (seconds since the epoch, nanoseconds, bytes used).
pub fn parse_rfc3339_utc(text: &str) -> Option<(i64, u32, usize)> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = text.get(from..from + len)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, s) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in b[at..at + digits].iter().enumerate() {
            if i < 9 {
                nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
            }
        }
        at += digits;
    }
    if b.get(at) != Some(&b'Z') {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s);
    Some((secs, nanos, at + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_read_back() {
        for (secs, nanos) in [
            (0, 0),
            (1_700_000_000, 120_000_000),
            (1_764_680_000, 5),
            (951_782_400, 0),
        ] {
            let text = rfc3339(secs, nanos);
            assert_eq!(parse_rfc3339_utc(&text), Some((secs, nanos, text.len())), "{text}");
        }
        assert_eq!(
            parse_rfc3339_utc("2026-12-02T17:30:00.123456Z qemu: x"),
            Some((1_796_232_600, 123_456_000, 27))
        );
        for bad in [
            "",
            "2026-12-02 17:30:00Z",
            "2026-13-02T17:30:00Z",
            "2026-12-02T17:30:00",
            "2026-12-02T17:30:00.Z",
            "x026-12-02T17:30:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_are_go_rfc3339nano() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000, 120_000_000), "2023-11-14T22:13:20.12Z");
        assert_eq!(rfc3339(951_782_400, 1), "2000-02-29T00:00:00.000000001Z");
    }

    #[test]
    fn lines_look_like_runc() {
        let j = format_line(Format::Json, "error", "container \"x\" does not exist", "T");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert_eq!(v["time"], "T");
        let t = format_line(Format::Text, "error", "a \"b\"", "T");
        assert_eq!(t, "time=\"T\" level=error msg=\"a \\\"b\\\"\"\n");
    }
}
