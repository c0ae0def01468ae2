//! `events`: runc's event stream of one container, as JSON lines on
//! stdout. `--stats` prints one `stats` event and exits; otherwise a
//! `stats` event every `--interval` (Go duration, default 5s) and an `oom`
//! event whenever the kernel in the guest OOM-kills in the container, until
//! the container stops.
//!
//! The stats' shape is runc's (`types.Stats`): cpu usage and throttling in
//! nanoseconds, memory usage/limit/max and OOM kills as `failcnt`, pids,
//! and bytes read and written (major/minor 0: the guest's devices mean
//! nothing on the host).

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tegmen_agent_api::agent::{event, ContainerStats};

use super::store::{self, Status};
use super::{connect_agent, log, validate_id, Error, Globals, Result};

/// runc's `types.Stats` from the agent's numbers.
pub fn stats_json(s: &ContainerStats) -> Value {
    let us = |v: u64| v.saturating_mul(1000);
    // cgroup v2 `max` reads as u64::MAX; runc reports the same.
    json!({
        "cpu": {
            "usage": {
                "total": us(s.cpu_usage_usec),
                "kernel": us(s.cpu_system_usec),
                "user": us(s.cpu_user_usec),
            },
            "throttling": {
                "periods": s.cpu_nr_periods,
                "throttledPeriods": s.cpu_nr_throttled,
                "throttledTime": us(s.cpu_throttled_usec),
            },
        },
        "memory": {
            "usage": {
                "limit": s.memory_limit,
                "usage": s.memory_usage,
                "max": s.memory_max_usage,
                "failcnt": s.oom_kills,
            },
        },
        "pids": {"current": s.pids_current, "limit": s.pids_limit},
        "blkio": {
            "ioServiceBytesRecursive": [
                {"op": "Read", "value": s.io_read_bytes},
                {"op": "Write", "value": s.io_write_bytes},
            ],
        },
    })
}

/// Go's `time.ParseDuration` for what `--interval` gets: a sequence of
/// decimal numbers with units (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || Error::State(format!("invalid value \"{s}\" for flag -interval: parse error"));
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = tail;
    }
    Ok(Duration::from_secs_f64(total))
}

/// One JSON line per event; the OOM watcher and the stats loop share stdout.
fn emit(out: &Mutex<std::io::Stdout>, event: &Value) {
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

pub fn events(globals: &Globals, id: &str, stats_once: bool, interval: Duration) -> Result<()> {
    let config = &globals.config;
    validate_id(id).map_err(|_| Error::NotExist(id.to_string()))?;
    let rec = store::load(config, id)?;
    if interval.is_zero() {
        return Err(Error::State("duration interval must be greater than 0".into()));
    }
    if store::status(config, id, rec.as_ref()) == Status::Stopped {
        return Err(Error::State(format!("container with id {id} is not running")));
    }
    let stdout = std::sync::Arc::new(Mutex::new(std::io::stdout()));
    let stats_event = || -> Result<Value> {
        let s = connect_agent(config, id)?.stats_container(id)?;
        Ok(json!({"type": "stats", "id": id, "data": stats_json(&s)}))
    };
    if stats_once {
        emit(&stdout, &stats_event()?);
        return Ok(());
    }

    // OOM kills as the agent reports them (a long poll on its own
    // connection); exits end nothing here, the stats loop sees the stop.
    let oom_client = connect_agent(config, id)?;
    let (oom_out, oom_id) = (stdout.clone(), id.to_string());
    std::thread::spawn(move || {
        while let Ok(e) = oom_client.get_event() {
            if let Some(event::Event::Oom(o)) = e.event {
                if o.container_id == oom_id {
                    emit(&oom_out, &json!({"type": "oom", "id": oom_id}));
                }
            }
        }
    });

    loop {
        let rec = store::load(config, id)?;
        if store::status(config, id, rec.as_ref()) == Status::Stopped {
            return Ok(());
        }
        match stats_event() {
            Ok(e) => emit(&stdout, &e),
            // runc logs a failed read and goes on.
            Err(e) => log::error(&format!("stats of {id}: {e}")),
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "s", "5x", "1.2.3s", "-1s"] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("\"{bad}\"")), "{bad}: {e}");
        }
    }

    #[test]
    fn stats_have_runcs_shape() {
        let s = ContainerStats {
            cpu_usage_usec: 7,
            cpu_user_usec: 5,
            cpu_system_usec: 2,
            cpu_nr_periods: 10,
            cpu_nr_throttled: 3,
            cpu_throttled_usec: 4,
            memory_usage: 100,
            memory_limit: 200,
            memory_max_usage: 150,
            oom_kills: 1,
            pids_current: 2,
            pids_limit: 9,
            io_read_bytes: 11,
            io_write_bytes: 12,
            ..Default::default()
        };
        let v = stats_json(&s);
        assert_eq!(v["cpu"]["usage"]["total"], 7000);
        assert_eq!(v["cpu"]["usage"]["kernel"], 2000);
        assert_eq!(v["cpu"]["throttling"]["throttledPeriods"], 3);
        assert_eq!(v["cpu"]["throttling"]["throttledTime"], 4000);
        assert_eq!(v["memory"]["usage"]["limit"], 200);
        assert_eq!(v["memory"]["usage"]["failcnt"], 1);
        assert_eq!(v["pids"]["current"], 2);
        assert_eq!(v["blkio"]["ioServiceBytesRecursive"][1]["value"], 12);
    }
}
