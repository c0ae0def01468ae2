//! A backend's counters for the operator (`supervisor metrics`): a Unix
//! socket beside the vhost-user one where each connection gets one JSON
//! line — `{"device":"vsock","counters":{"tx_packets":12,...}}` — and EOF.
//! Nothing is read from the client, so it cannot drive the backend; the
//! snapshot is taken when asked, so the numbers are current and an idle
//! backend does no work for them.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

/// How long a client may take to read the line before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `snapshot()` (an object of counter names to numbers) on
/// `listener` from a thread of its own, for the life of the process.
pub fn spawn(
    listener: UnixListener,
    device: &str,
    snapshot: impl Fn() -> serde_json::Value + Send + 'static,
) -> std::io::Result<()> {
    let device = device.to_string();
    std::thread::Builder::new()
        .name(format!("{device}-stats"))
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let line = serde_json::json!({"device": device, "counters": snapshot()});
                let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
                let _ = writeln!(conn, "{line}");
            }
        })?;
    Ok(())
}

/// Binds `path` (replacing a stale socket) and serves there; a failure is
/// logged and the backend goes on without it.
pub fn bind_and_spawn(path: &std::path::Path, device: &str, snapshot: impl Fn() -> serde_json::Value + Send + 'static) {
    let _ = crate::devices::vsock::remove_stale_socket(path);
    let served = crate::unix_path::bind(path).and_then(|l| spawn(l, device, snapshot));
    if let Err(e) = served {
        log::warn!("{device}: counters not served on {}: {e}", path.display());
    }
}

/// The counters of a `Serialize` struct of integers, as [`spawn`] wants them.
pub fn counters_of(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|_| serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[derive(serde::Serialize)]
    struct C {
        a: u64,
        b: u64,
    }

    #[test]
    fn each_connection_gets_one_line_of_current_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.stats");
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let n2 = n.clone();
        spawn(UnixListener::bind(&path).unwrap(), "test", move || {
            counters_of(&C {
                a: n2.load(std::sync::atomic::Ordering::Relaxed),
                b: 7,
            })
        })
        .unwrap();
        for want in [1, 5] {
            n.store(want, std::sync::atomic::Ordering::Relaxed);
            let mut text = String::new();
            std::os::unix::net::UnixStream::connect(&path)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["device"], "test");
            assert_eq!(
                (v["counters"]["a"].as_u64(), v["counters"]["b"].as_u64()),
                (Some(want), Some(7))
            );
        }
    }
}
