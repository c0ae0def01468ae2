//! OCI hooks of the runtime namespace, run on the host: `prestart` and
//! `createRuntime` once the container exists in its VM (status
//! `creating`), `poststart` after `start` (`running`), `poststop` when the
//! container is deleted (`stopped`). Each gets the container's OCI state on
//! stdin and is killed at its `timeout`. The container-namespace hooks
//! (`createContainer`, `startContainer`) stay in the spec the guest gets:
//! libcontainer runs them there.
//!
//! Errors read as runc's: `error running hook #N: error running hook: exit
//! status 1, stdout: …, stderr: …`, or `hook ran past specified timeout of
//! 2.0s`.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Error, Result};

/// The phases that run on the host, in the spec's spelling.
pub const HOST_PHASES: [&str; 4] = ["prestart", "createRuntime", "poststart", "poststop"];
/// The phases that run in the guest (in the container's namespaces).
pub const GUEST_PHASES: [&str; 2] = ["createContainer", "startContainer"];

/// Checks `hooks` of a spec; the error names the field.
pub fn validate(hooks: &Value) -> std::result::Result<(), String> {
    if hooks.is_null() {
        return Ok(());
    }
    let Some(map) = hooks.as_object() else {
        return Err("\"hooks\" must be an object".into());
    };
    for (phase, list) in map {
        if !HOST_PHASES.contains(&phase.as_str()) && !GUEST_PHASES.contains(&phase.as_str()) {
            continue;
        }
        let Some(list) = list.as_array() else {
            return Err(format!("\"hooks.{phase}\" must be a list"));
        };
        for (i, h) in list.iter().enumerate() {
            let field = |f: &str| format!("\"hooks.{phase}[{i}].{f}\"");
            match h["path"].as_str() {
                Some(p) if p.starts_with('/') => {}
                Some(_) => return Err(format!("{} must be an absolute path", field("path"))),
                None => return Err(format!("{} is missing", field("path"))),
            }
            for key in ["args", "env"] {
                let v = &h[key];
                if !v.is_null() && !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err(format!("{} must be a list of strings", field(key)));
                }
            }
            let t = &h["timeout"];
            if !t.is_null() && t.as_i64().is_none_or(|t| t <= 0) {
                return Err(format!("{} must be a positive number of seconds", field("timeout")));
            }
        }
    }
    Ok(())
}

/// Removes the host phases from `spec` and returns them (an object, empty
/// when the spec has none).
pub fn take_host_hooks(spec: &mut Value) -> Value {
    let mut host = serde_json::Map::new();
    if let Some(hooks) = spec.get_mut("hooks").and_then(Value::as_object_mut) {
        for phase in HOST_PHASES {
            if let Some(list) = hooks.remove(phase) {
                host.insert(phase.to_string(), list);
            }
        }
    }
    Value::Object(host)
}

/// The OCI state hooks read on stdin.
pub fn state(oci_version: &str, id: &str, status: &str, pid: i32, bundle: &str, annotations: &Value) -> Value {
    let mut s = serde_json::json!({
        "ociVersion": oci_version,
        "id": id,
        "status": status,
        "bundle": bundle,
    });
    if pid > 0 {
        s["pid"] = pid.into();
    }
    if annotations.as_object().is_some_and(|a| !a.is_empty()) {
        s["annotations"] = annotations.clone();
    }
    s
}

/// Runs the hooks of `phase` in order; the first failure ends the run.
pub fn run(hooks: &Value, phase: &str, state: &Value) -> Result<()> {
    let Some(list) = hooks[phase].as_array() else {
        return Ok(());
    };
    for (i, h) in list.iter().enumerate() {
        super::log::debug(&format!("running {phase} hook #{i}: {}", h["path"]));
        run_one(h, state).map_err(|e| Error::Hook(format!("error running hook #{i}: {e}")))?;
    }
    Ok(())
}

/// Output a hook leaves unread past this is dropped (the error shows it).
const OUTPUT_LIMIT: u64 = 64 * 1024;

fn run_one(h: &Value, state: &Value) -> std::result::Result<(), String> {
    let path = h["path"].as_str().ok_or("the hook has no path")?;
    let strings = |key: &str| -> Vec<String> {
        h[key]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let args = strings("args");
    let mut cmd = Command::new(path);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some((first, rest)) = args.split_first() {
        cmd.arg0(first).args(rest);
    }
    // As runc (Go's exec.Cmd): a hook with an `env` list gets exactly that
    // environment, one without inherits the runtime's.
    if h["env"].is_array() {
        cmd.env_clear();
        for kv in strings("env") {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
        format!("fork/exec {path}: {}", errno.desc().to_lowercase())
    })?;

    let body = state.to_string().into_bytes();
    let mut stdin = child.stdin.take().expect("piped");
    std::thread::spawn(move || {
        // A hook that does not read its stdin is no error.
        let _ = stdin.write_all(&body);
    });
    let collect = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        if let Some(r) = r {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.take(OUTPUT_LIMIT).read_to_end(&mut buf);
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            });
        }
        rx
    };
    let stdout = collect(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let stderr = collect(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));

    let timeout = h["timeout"]
        .as_i64()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if let Some(t) = timeout {
            if started.elapsed() >= t {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("hook ran past specified timeout of {:.1}s", t.as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(());
    }
    // A daemon the hook left behind may hold its pipes: wait a little only.
    let grace = Duration::from_secs(1);
    let out = stdout.recv_timeout(grace).unwrap_or_default();
    let err = stderr.recv_timeout(grace).unwrap_or_default();
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!(
            "signal: {}",
            nix::sys::signal::Signal::try_from(sig)
                .map(|s| describe_signal(s).to_string())
                .unwrap_or_else(|_| sig.to_string())
        ),
        _ => "unknown exit".into(),
    };
    Err(format!("error running hook: {how}, stdout: {out}, stderr: {err}"))
}

/// Go's names of the signals that end hooks most often.
fn describe_signal(s: nix::sys::signal::Signal) -> &'static str {
    use nix::sys::signal::Signal::*;
    match s {
        SIGKILL => "killed",
        SIGTERM => "terminated",
        SIGINT => "interrupt",
        SIGSEGV => "segmentation fault",
        SIGABRT => "aborted",
        SIGHUP => "hangup",
        other => other.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn st() -> Value {
        state("1.0.2", "c1", "creating", 42, "/b", &json!({"a": "b"}))
    }

    #[test]
    fn host_phases_leave_the_spec() {
        let mut spec = json!({"hooks": {
            "prestart": [{"path": "/a"}], "createRuntime": [{"path": "/b"}],
            "createContainer": [{"path": "/c"}], "startContainer": [{"path": "/d"}],
            "poststart": [{"path": "/e"}], "poststop": [{"path": "/f"}]}});
        let host = take_host_hooks(&mut spec);
        let mut kept: Vec<_> = spec["hooks"].as_object().unwrap().keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["createContainer", "startContainer"]);
        assert_eq!(host.as_object().unwrap().len(), 4);
        assert_eq!(host["poststop"][0]["path"], "/f");
        assert_eq!(take_host_hooks(&mut json!({})), json!({}));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate(&Value::Null).is_ok());
        assert!(validate(&json!({"prestart": [{"path": "/bin/true", "args": ["true"], "timeout": 3}]})).is_ok());
        let cases = [
            (json!([]), "\"hooks\" must be an object"),
            (json!({"poststop": {}}), "\"hooks.poststop\" must be a list"),
            (json!({"poststart": [{}]}), "\"hooks.poststart[0].path\" is missing"),
            (
                json!({"prestart": [{"path": "true"}]}),
                "\"hooks.prestart[0].path\" must be an absolute path",
            ),
            (
                json!({"createRuntime": [{"path": "/x", "args": [1]}]}),
                "\"hooks.createRuntime[0].args\" must be a list of strings",
            ),
            (
                json!({"poststop": [{"path": "/x"}, {"path": "/x", "timeout": 0}]}),
                "\"hooks.poststop[1].timeout\" must be a positive number of seconds",
            ),
        ];
        for (hooks, want) in cases {
            assert_eq!(validate(&hooks).unwrap_err(), want);
        }
    }

    #[test]
    fn state_reaches_stdin_with_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "printf '%s %s %s\\n' \"$(head -c 7 /proc/$$/cmdline)\" \"$0\" \"$HOOK_VAR\" > {0}; cat >> {0}",
            out.display()
        );
        let hooks = json!({"poststart": [{"path": "/bin/sh", "args": ["my-hook", "-c", script, "zero"], "env": ["HOOK_VAR=v"]}]});
        run(&hooks, "poststart", &st()).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (line, state) = text.split_once('\n').unwrap();
        assert_eq!(line, "my-hook zero v");
        let state: Value = serde_json::from_str(state).unwrap();
        assert_eq!(
            state,
            json!({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42, "bundle": "/b", "annotations": {"a": "b"}})
        );
        // Phases without hooks run nothing.
        run(&hooks, "poststop", &st()).unwrap();

        // Without `env` the hook inherits the runtime's environment; with
        // one, it gets exactly that.
        let probe = |hook: Value| {
            let out = dir.path().join("env");
            let mut h = hook;
            h["path"] = "/bin/sh".into();
            h["args"] = json!(["sh", "-c", format!("echo \"${{HOME:-unset}}\" > {}", out.display())]);
            run(&json!({"prestart": [h]}), "prestart", &st()).unwrap();
            std::fs::read_to_string(&out).unwrap().trim().to_string()
        };
        assert_eq!(
            probe(json!({})),
            std::env::var("HOME").unwrap_or_else(|_| "unset".into())
        );
        assert_eq!(probe(json!({"env": []})), "unset");
    }

    #[test]
    fn failures_read_as_runcs() {
        let hooks = json!({"prestart": [
            {"path": "/bin/true"},
            {"path": "/bin/sh", "args": ["sh", "-c", "echo out; echo err >&2; exit 3"]}]});
        let e = run(&hooks, "prestart", &st()).unwrap_err().to_string();
        assert_eq!(
            e,
            "error running hook #1: error running hook: exit status 3, stdout: out\n, stderr: err\n"
        );

        let hooks = json!({"prestart": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]});
        let t = Instant::now();
        let e = run(&hooks, "prestart", &st()).unwrap_err().to_string();
        assert_eq!(e, "error running hook #0: hook ran past specified timeout of 1.0s");
        assert!(t.elapsed() < Duration::from_secs(10));

        let hooks = json!({"prestart": [{"path": "/no/such/hook"}]});
        let e = run(&hooks, "prestart", &st()).unwrap_err().to_string();
        assert_eq!(
            e,
            "error running hook #0: fork/exec /no/such/hook: no such file or directory"
        );

        let hooks = json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "kill -9 $$"]}]});
        let e = run(&hooks, "prestart", &st()).unwrap_err().to_string();
        assert_eq!(
            e,
            "error running hook #0: error running hook: signal: killed, stdout: , stderr: "
        );
    }
}
