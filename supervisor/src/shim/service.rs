//! The task API of one pod's shim.
//!
//! State lives in the shim ([`Inner::state`], a plain mutex never held
//! across a guest call): State, Connect and Wait answer from it at once.
//! Guest calls run on tokio's blocking threads. The first Create of the
//! pod (its sandbox container, or a container of its own) boots the VM
//! through the sandbox library; every container is then added to that
//! sandbox ([`Sandbox::add_container`]).
//!
//! Exits: each process has a waiter thread (`WaitProcess` in the guest);
//! when it returns, the process's output is drained ([`ProcessIo::drain`]),
//! a TaskOOM is published if the container was OOM-killed and none went
//! out yet, and only then the exit is recorded, Wait answered and TaskExit
//! published. If the VM dies, every wait fails and every process of the
//! pod exits 255.
//!
//! The pid containerd gets for every process is the shim's: CRI builds the
//! pod's namespace paths from it (`/proc/<pid>/ns/…`, see [`super::spec`]).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::{EnumOrUnknown, MessageField};
use tegmen_agent_api::agent::ExecProcessRequest as GuestExecRequest;
use tegmen_shim_api::shim::*;
use tegmen_shim_api::shim_ttrpc::{create_task, Task};
use tegmen_shim_api::task::{ProcessInfo, Status};
use tegmen_shim_api::task_events::*;
use tegmen_shim_api::{cgroups_v2, from_any, runtimeoptions, to_any};
use tokio::sync::{watch, Notify};
use ttrpc::r#async::TtrpcContext;

use super::events::Publisher;
use super::io::{ProcessIo, StdioPaths};
use super::{spec, BundleState, Flags, BUNDLE_STATE_FILE};
use crate::agent_client::{AgentClient, StreamEndpoint};
use crate::config::Config;
use crate::container::NewContainer;
use crate::runtime::bundle::Bundle;
use crate::sandbox::{unmount_below, Face, Sandbox, SandboxOptions};

/// The config file `start` got from containerd's runtime options.
pub const CONFIG_PATH_ENV: &str = "TEGMEN_SHIM_CONFIG";

type RpcResult<T> = ttrpc::Result<T>;

fn rpc_err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}
fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    rpc_err(ttrpc::Code::NOT_FOUND, format!("{what}: not found"))
}
fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    rpc_err(ttrpc::Code::INTERNAL, e.to_string())
}

pub fn timestamp_now() -> Timestamp {
    Timestamp::now()
}

fn timestamp_from_nanos(nanos: i64) -> Timestamp {
    if nanos <= 0 {
        return Timestamp::now();
    }
    Timestamp {
        seconds: nanos / 1_000_000_000,
        nanos: (nanos % 1_000_000_000) as i32,
        ..Default::default()
    }
}

/// The config file named by containerd's runtime options, if any.
pub fn config_path_from_options(any: &Any) -> Option<PathBuf> {
    let opts: runtimeoptions::Options = from_any(any).ok().flatten()?;
    (!opts.config_path.is_empty()).then(|| PathBuf::from(opts.config_path))
}

/// Unmounts whatever the shim mounted on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    unmount_below(&bundle.join("rootfs"));
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: (i64, i32),
}

impl Exit {
    fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.at.0,
            nanos: self.at.1,
            ..Default::default()
        }
    }
}

struct Proc {
    stdio: StdioPaths,
    /// An exec's OCI process, JSON.
    process_json: Option<String>,
    started: bool,
    exit: watch::Sender<Option<Exit>>,
    io: Option<ProcessIo>,
}

impl Proc {
    fn new(stdio: StdioPaths, process_json: Option<String>) -> Proc {
        Proc {
            stdio,
            process_json,
            started: false,
            exit: watch::channel(None).0,
            io: None,
        }
    }
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

struct Ctr {
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
    oom_published: bool,
}

impl Ctr {
    fn process(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

struct Pod {
    id: String,
    config: Config,
    sandbox: Arc<Mutex<Sandbox>>,
    agent: AgentClient,
    endpoint: StreamEndpoint,
    /// The sandbox container's init in the guest.
    sandbox_guest_pid: Option<i32>,
    /// The guest's listening ports on the pod netns' loopback, where CRI's
    /// PortForward dials them.
    _ports: Option<crate::portforward::PortMirror>,
}

#[derive(Default)]
struct State {
    pod: Option<Pod>,
    containers: HashMap<String, Ctr>,
}

pub struct Inner {
    flags: Flags,
    pid: u32,
    state: Mutex<State>,
    events: Publisher,
    shutdown: Arc<Notify>,
}

#[derive(Clone)]
pub struct Service(Arc<Inner>);

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> RpcResult<T> + Send + 'static) -> RpcResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

impl Inner {
    fn agent(&self) -> RpcResult<AgentClient> {
        lock(&self.state)
            .pod
            .as_ref()
            .map(|p| p.agent.clone())
            .ok_or_else(|| rpc_err(ttrpc::Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }

    fn with_proc<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut Proc) -> T) -> RpcResult<T> {
        let mut st = lock(&self.state);
        let ctr = st
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        let p = ctr
            .process(exec_id)
            .ok_or_else(|| not_found(format!("exec {exec_id} of {id}")))?;
        Ok(f(p))
    }

    fn create(self: &Arc<Self>, req: CreateTaskRequest) -> RpcResult<CreateTaskResponse> {
        let id = req.id.clone();
        crate::sandbox::validate_id(&id).map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        if lock(&self.state).containers.contains_key(&id) {
            return Err(rpc_err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {id}: already exists"),
            ));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            namespace: self.flags.namespace.clone(),
        };
        stdio
            .validate()
            .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        mount_rootfs(&bundle_dir, &req.rootfs).map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        let made = self.create_mounted(&req, &bundle_dir, stdio);
        if made.is_err() {
            unmount_rootfs(&bundle_dir);
        }
        made
    }

    fn create_mounted(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        bundle_dir: &Path,
        stdio: StdioPaths,
    ) -> RpcResult<CreateTaskResponse> {
        let id = req.id.as_str();
        let bundle =
            Bundle::load_pod_member(bundle_dir).map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod_id = spec::pod_id(id, &bundle.spec);
        let is_sandbox = spec::is_sandbox_container(id, &bundle.spec);
        if is_sandbox {
            if lock(&self.state).pod.is_some() {
                return Err(rpc_err(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("pod {pod_id}: this shim already runs a pod"),
                ));
            }
            let options_path = req.options.as_ref().and_then(config_path_from_options);
            let env_path = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
            let mut config = super::load_config(options_path.or(env_path).as_deref())
                .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e))?;
            let (memory, vcpus) = spec::vm_size(&bundle.spec, &config.guest)
                .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, format!("pod {pod_id}: {e}")))?;
            config.guest.memory_mib = memory;
            config.guest.vcpus = vcpus;
            // The pod's VM in the sandbox container's host cgroup.
            let cgroup = crate::cgroup::vm_request(
                &bundle.spec,
                id,
                crate::cgroup::is_systemd_form(bundle.spec["linux"]["cgroupsPath"].as_str().unwrap_or("")),
                (memory, vcpus),
                config.guest.host_overhead_mib,
            )
            .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, format!("pod {pod_id}: {e}")))?;
            let netns = crate::runtime::bundle::network_namespace_path(&bundle.spec);
            let sandbox = Sandbox::create(
                &config,
                &pod_id,
                &SandboxOptions {
                    owned_by_current_process: true,
                    face: Face::Shim,
                    cgroup: Some(cgroup),
                    nics: Vec::new(),
                    // CNI's namespace of the pod, wired to the VM's NICs.
                    netns: netns.clone(),
                },
            )
            .map_err(|e| internal(format!("pod {pod_id}: {e}")))?;
            let ports = match &netns {
                Some(ns) => {
                    let (agent, endpoint) = (sandbox.agent().clone(), sandbox.stream_endpoint());
                    let mirror = crate::portforward::PortMirror::start(
                        Some(ns),
                        move || agent.listening_ports(),
                        move |port| endpoint.open_forward(port),
                    );
                    // Port-forward is not worth failing the pod for.
                    mirror
                        .map_err(|e| tracing::warn!("pod {pod_id}: no port-forward: {e}"))
                        .ok()
                }
                None => None,
            };
            let pod = Pod {
                id: pod_id.clone(),
                agent: sandbox.agent().clone(),
                endpoint: sandbox.stream_endpoint(),
                sandbox: Arc::new(Mutex::new(sandbox)),
                config,
                sandbox_guest_pid: None,
                _ports: ports,
            };
            spawn_event_loop(self.clone(), pod.agent.clone());
            lock(&self.state).pod = Some(pod);
        }
        let (sandbox, agent, endpoint, root, sandbox_pid) = {
            let st = lock(&self.state);
            match st.pod.as_ref() {
                Some(p) if p.id == pod_id => (
                    p.sandbox.clone(),
                    p.agent.clone(),
                    p.endpoint.clone(),
                    p.config.root.clone(),
                    p.sandbox_guest_pid,
                ),
                Some(p) => {
                    return Err(rpc_err(
                        ttrpc::Code::FAILED_PRECONDITION,
                        format!("container {id}: pod {pod_id} is not this shim's (it runs pod {})", p.id),
                    ))
                }
                None => {
                    return Err(rpc_err(
                        ttrpc::Code::FAILED_PRECONDITION,
                        format!("container {id}: pod {pod_id} has no VM in this shim"),
                    ))
                }
            }
        };
        let fail_pod = |e: ttrpc::Error| {
            if is_sandbox {
                // Nothing of the pod stays: its VM goes with the sandbox.
                if let Some(pod) = lock(&self.state).pod.take() {
                    drop(pod);
                }
            }
            e
        };
        let binds = bundle.host_binds();
        let mut guest = bundle.guest_spec();
        spec::map_for_guest(
            &mut guest,
            &pod_id,
            id,
            self.pid,
            if is_sandbox { None } else { sandbox_pid },
        )
        .map_err(|e| fail_pod(rpc_err(ttrpc::Code::INVALID_ARGUMENT, e)))?;
        // An app container's own host cgroup exists, as runc would make it;
        // the VM that runs it is in the sandbox container's.
        let own_cgroup = if is_sandbox {
            None
        } else {
            let path = bundle.spec["linux"]["cgroupsPath"].as_str().unwrap_or("");
            Some(
                crate::cgroup::container_request(&bundle.spec, id, crate::cgroup::is_systemd_form(path))
                    .map_err(|e| fail_pod(rpc_err(ttrpc::Code::INVALID_ARGUMENT, format!("container {id}: {e}"))))?,
            )
        };
        let added = sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_container(&NewContainer {
                id,
                rootfs: &bundle.rootfs,
                readonly: bundle.readonly,
                binds: &binds,
                guest_spec: guest,
                mount_destinations: crate::container::mount_destinations(&bundle.spec),
                terminal: bundle.terminal || req.terminal,
                stdin: !req.stdin.is_empty(),
                bundle: Some(bundle.dir.clone()),
                cgroup: own_cgroup,
            })
            .map_err(|e| fail_pod(internal(e)))?;
        let io = match ProcessIo::open(&endpoint, id, "", &stdio) {
            Ok(io) => io,
            Err(e) => {
                let _ = sandbox.lock().unwrap_or_else(|p| p.into_inner()).remove_container(id);
                return Err(fail_pod(internal(e)));
            }
        };
        let state = BundleState {
            pod: pod_id.clone(),
            root,
            shim_pid: self.pid,
        };
        let _ = std::fs::write(
            bundle_dir.join(BUNDLE_STATE_FILE),
            serde_json::to_vec(&state).expect("serializes"),
        );
        let mut init = Proc::new(stdio.clone(), None);
        init.io = Some(io);
        {
            let mut st = lock(&self.state);
            if is_sandbox {
                if let Some(p) = st.pod.as_mut() {
                    p.sandbox_guest_pid = Some(added.guest_pid);
                }
            }
            st.containers.insert(
                id.to_string(),
                Ctr {
                    bundle: bundle_dir.to_path_buf(),
                    init,
                    execs: HashMap::new(),
                    paused: false,
                    oom_published: false,
                },
            );
        }
        // The init may die before Start (a kill of a created container).
        spawn_waiter(self.clone(), agent, id.to_string(), String::new());
        self.events.publish(&TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid: self.pid,
            ..Default::default()
        });
        Ok(CreateTaskResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> RpcResult<StartResponse> {
        let agent = self.agent()?;
        let (started, process_json, stdio) =
            self.with_proc(id, exec_id, |p| (p.started, p.process_json.clone(), p.stdio.clone()))?;
        if started {
            return Err(rpc_err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{id} {exec_id}: already started"),
            ));
        }
        if exec_id.is_empty() {
            agent.start_container(id).map_err(internal)?;
            self.with_proc(id, "", |p| p.started = true)?;
            self.events.publish(&TaskStart {
                container_id: id.into(),
                pid: self.pid,
                ..Default::default()
            });
        } else {
            let endpoint = lock(&self.state)
                .pod
                .as_ref()
                .map(|p| p.endpoint.clone())
                .expect("agent implies pod");
            agent
                .exec_process(&GuestExecRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    process_json: process_json.unwrap_or_default(),
                    terminal: stdio.terminal,
                    stdin: !stdio.stdin.is_empty(),
                    ..Default::default()
                })
                .map_err(|e| rpc_err(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?;
            let io = ProcessIo::open(&endpoint, id, exec_id, &stdio);
            let io = match io {
                Ok(io) => io,
                Err(e) => {
                    let _ = agent.signal_process(id, exec_id, libc::SIGKILL as u32, false);
                    return Err(internal(e));
                }
            };
            self.with_proc(id, exec_id, |p| {
                p.started = true;
                p.io = Some(io);
            })?;
            spawn_waiter(self.clone(), agent, id.into(), exec_id.into());
            self.events.publish(&TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid: self.pid,
                ..Default::default()
            });
        }
        Ok(StartResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> RpcResult<DeleteResponse> {
        if !exec_id.is_empty() {
            let exit = {
                let mut st = lock(&self.state);
                let ctr = st
                    .containers
                    .get_mut(id)
                    .ok_or_else(|| not_found(format!("container {id}")))?;
                let p = ctr
                    .execs
                    .get(exec_id)
                    .ok_or_else(|| not_found(format!("exec {exec_id}")))?;
                if p.started && p.exited().is_none() {
                    return Err(rpc_err(
                        ttrpc::Code::FAILED_PRECONDITION,
                        format!("exec {exec_id} of {id} is running"),
                    ));
                }
                let exit = p.exited();
                ctr.execs.remove(exec_id);
                exit
            };
            return Ok(delete_response(self.pid, exit));
        }
        let (bundle, exit, running) = {
            let st = lock(&self.state);
            let ctr = st
                .containers
                .get(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            let exit = ctr.init.exited();
            (ctr.bundle.clone(), exit, ctr.init.started && exit.is_none())
        };
        if running {
            return Err(rpc_err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("cannot delete container {id}: it is running"),
            ));
        }
        let sandbox = lock(&self.state).pod.as_ref().map(|p| p.sandbox.clone());
        if let Some(sb) = sandbox {
            if let Err(e) = sb.lock().unwrap_or_else(|p| p.into_inner()).remove_container(id) {
                tracing::warn!("delete {id}: {e}");
            }
        }
        unmount_rootfs(&bundle);
        let _ = std::fs::remove_file(bundle.join(BUNDLE_STATE_FILE));
        lock(&self.state).containers.remove(id);
        let resp = delete_response(self.pid, exit);
        self.events.publish(&TaskDelete {
            container_id: id.into(),
            pid: self.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            id: id.into(),
            ..Default::default()
        });
        Ok(resp)
    }

    /// Ends the pod: its VM and every process of it.
    fn shutdown_pod(&self) {
        let pod = lock(&self.state).pod.take();
        let Some(pod) = pod else { return };
        let (id, config, sandbox) = (pod.id.clone(), pod.config.clone(), pod.sandbox.clone());
        drop(pod);
        match Arc::try_unwrap(sandbox) {
            Ok(m) => {
                let sb = m.into_inner().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = sb.shutdown() {
                    tracing::warn!("shutdown: {e}");
                }
            }
            Err(_) => {
                // A call still holds the sandbox: the process is about to
                // exit without running its destructors, so remove the VM
                // and everything of it by id now.
                if let Err(e) = crate::sandbox::destroy(&config, &id) {
                    tracing::warn!("shutdown: {e}");
                }
            }
        }
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> DeleteResponse {
    let (code, at) = match exit {
        Some(e) => (e.code, e.timestamp()),
        None => (128 + libc::SIGKILL as u32, Timestamp::now()),
    };
    DeleteResponse {
        pid,
        exit_status: code,
        exited_at: MessageField::some(at),
        ..Default::default()
    }
}

/// Mounts containerd's rootfs mounts (a snapshot) on `<bundle>/rootfs`.
fn mount_rootfs(bundle: &Path, mounts: &[tegmen_shim_api::mount::Mount]) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let target = bundle.join("rootfs");
    for m in mounts {
        std::fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                other => data.push(other.to_string()),
            }
        }
        let data = data.join(",");
        let fstype = if m.type_ == "bind" {
            None
        } else {
            Some(m.type_.as_str())
        };
        mount(
            Some(m.source.as_str()),
            &target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| {
            format!(
                "mounting the rootfs ({} {}) on {}: {e}",
                m.type_,
                m.source,
                target.display()
            )
        })?;
        if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
            let _ = mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
    Ok(())
}

/// Waits for one process in the guest, then reports its exit (see the
/// module docs).
fn spawn_waiter(inner: Arc<Inner>, agent: AgentClient, id: String, exec_id: String) {
    std::thread::spawn(move || {
        let waited = agent.wait_process(&id, &exec_id);
        let (code, at) = match &waited {
            Ok(w) => (w.exit_code.max(0) as u32, timestamp_from_nanos(w.exited_at_unix_nanos)),
            Err(e) => {
                tracing::warn!("{id} {exec_id}: the wait ended without an exit ({e}); reporting 255");
                (255, Timestamp::now())
            }
        };
        let io = inner.with_proc(&id, &exec_id, |p| p.io.take()).ok().flatten();
        if let Some(io) = io {
            io.drain();
        }
        if exec_id.is_empty() && waited.is_ok() {
            let oom = agent.stats_container(&id).map(|s| s.oom_kills > 0).unwrap_or(false);
            let publish = oom && {
                let mut st = lock(&inner.state);
                st.containers
                    .get_mut(&id)
                    .is_some_and(|c| !std::mem::replace(&mut c.oom_published, true))
            };
            if publish {
                inner.events.publish(&TaskOOM {
                    container_id: id.clone(),
                    ..Default::default()
                });
            }
        }
        if !exec_id.is_empty() && waited.is_ok() {
            let _ = agent.remove_process(&id, &exec_id);
        }
        let exit = Exit {
            code,
            at: (at.seconds, at.nanos),
        };
        let known = inner
            .with_proc(&id, &exec_id, |p| p.exit.send_replace(Some(exit)))
            .is_ok();
        if known {
            inner.events.publish(&TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() {
                    id.clone()
                } else {
                    exec_id.clone()
                },
                pid: inner.pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
    });
}

/// Publishes OOM kills as the guest reports them.
fn spawn_event_loop(inner: Arc<Inner>, agent: AgentClient) {
    std::thread::spawn(move || {
        while let Ok(event) = agent.get_event() {
            if !event.has_oom() {
                continue;
            }
            let oom = event.oom();
            let id = oom.container_id.clone();
            let known = {
                let mut st = lock(&inner.state);
                st.containers.get_mut(&id).map(|c| c.oom_published = true).is_some()
            };
            if known {
                inner.events.publish(&TaskOOM {
                    container_id: id,
                    ..Default::default()
                });
            }
        }
    });
}

fn metrics(s: &tegmen_agent_api::agent::ContainerStats) -> cgroups_v2::Metrics {
    cgroups_v2::Metrics {
        pids: MessageField::some(cgroups_v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(cgroups_v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(cgroups_v2::MemoryStat {
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            ..Default::default()
        }),
        memory_events: MessageField::some(cgroups_v2::MemoryEvents {
            oom_kill: s.oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Service {
    /// Pause (freeze) or Resume: the guest call, the shim's state, the event.
    async fn set_paused(&self, id: String, paused: bool) -> RpcResult<Empty> {
        let agent = self.0.agent()?;
        let guest_id = id.clone();
        blocking(move || {
            if paused {
                agent.pause_container(&guest_id)
            } else {
                agent.resume_container(&guest_id)
            }
            .map_err(internal)
        })
        .await?;
        if let Some(c) = lock(&self.0.state).containers.get_mut(&id) {
            c.paused = paused;
        }
        if paused {
            self.0.events.publish(&TaskPaused {
                container_id: id,
                ..Default::default()
            });
        } else {
            self.0.events.publish(&TaskResumed {
                container_id: id,
                ..Default::default()
            });
        }
        Ok(Empty::new())
    }
}

#[async_trait]
impl Task for Service {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> RpcResult<StateResponse> {
        let st = lock(&self.0.state);
        let ctr = st
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = if req.exec_id.is_empty() {
            &ctr.init
        } else {
            ctr.execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(format!("exec {}", req.exec_id)))?
        };
        let exit = p.exited();
        let status = match (exit, p.started, ctr.paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, true, true) => Status::PAUSED,
            (None, true, false) => Status::RUNNING,
            (None, false, _) => Status::CREATED,
        };
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: ctr.bundle.display().to_string(),
            pid: self.0.pid,
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.code),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> RpcResult<CreateTaskResponse> {
        let inner = self.0.clone();
        blocking(move || inner.create(req)).await
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> RpcResult<StartResponse> {
        let inner = self.0.clone();
        blocking(move || inner.start(&req.id, &req.exec_id)).await
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> RpcResult<DeleteResponse> {
        let inner = self.0.clone();
        blocking(move || inner.delete(&req.id, &req.exec_id)).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> RpcResult<PidsResponse> {
        let agent = self.0.agent()?;
        let pids = blocking(move || agent.list_processes(&req.id).map_err(internal)).await?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid.max(0) as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> RpcResult<Empty> {
        self.set_paused(req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> RpcResult<Empty> {
        self.set_paused(req.id, false).await
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: CheckpointTaskRequest) -> RpcResult<Empty> {
        Err(rpc_err(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint: not supported by Tegmen",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> RpcResult<Empty> {
        let exited = self.0.with_proc(&req.id, &req.exec_id, |p| p.exited().is_some())?;
        if exited && !req.all {
            return Err(not_found("process already finished"));
        }
        let agent = self.0.agent()?;
        blocking(move || {
            agent
                .signal_process(&req.id, &req.exec_id, req.signal, req.all)
                .map_err(internal)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> RpcResult<Empty> {
        crate::sandbox::validate_id(&req.exec_id)
            .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, format!("exec id: {e}")))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            namespace: self.0.flags.namespace.clone(),
        };
        stdio
            .validate()
            .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let process: serde_json::Value = serde_json::from_slice(&spec).map_err(|e| {
            rpc_err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {}: process spec: {e}", req.exec_id),
            )
        })?;
        {
            let mut st = lock(&self.0.state);
            let ctr = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if ctr.init.exited().is_some() {
                return Err(rpc_err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is stopped", req.id),
                ));
            }
            if ctr.execs.contains_key(&req.exec_id) {
                return Err(rpc_err(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {}: already exists", req.exec_id),
                ));
            }
            ctr.execs
                .insert(req.exec_id.clone(), Proc::new(stdio, Some(process.to_string())));
        }
        self.0.events.publish(&TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> RpcResult<Empty> {
        self.0.with_proc(&req.id, &req.exec_id, |_| ())?;
        let agent = self.0.agent()?;
        blocking(move || {
            agent
                .resize_tty(&req.id, &req.exec_id, req.height, req.width)
                .map_err(internal)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> RpcResult<Empty> {
        if req.stdin {
            self.0.with_proc(&req.id, &req.exec_id, |p| {
                if let Some(io) = p.io.as_mut() {
                    io.close_stdin();
                }
            })?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> RpcResult<Empty> {
        let json = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let json = String::from_utf8(json)
            .map_err(|_| rpc_err(ttrpc::Code::INVALID_ARGUMENT, "update: resources are not JSON text"))?;
        let agent = self.0.agent()?;
        let sandbox = lock(&self.0.state).pod.as_ref().map(|p| p.sandbox.clone());
        blocking(move || {
            agent.update_container(&req.id, &json).map_err(internal)?;
            // The host cgroup follows: an app container's own, or the VM's
            // for the sandbox container.
            let Some(sandbox) = sandbox else { return Ok(()) };
            let resources: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| rpc_err(ttrpc::Code::INVALID_ARGUMENT, format!("update: resources: {e}")))?;
            let sb = sandbox.lock().unwrap_or_else(|p| p.into_inner());
            let own = sb
                .state()
                .containers
                .iter()
                .find(|c| c.id == req.id)
                .and_then(|c| c.host_cgroup.clone());
            let updated = match (own, sb.host_cgroup()) {
                (Some(cg), _) => crate::cgroup::Limits::from_spec(&resources).and_then(|l| cg.update(&l)),
                (None, Some(vm)) => crate::cgroup::vm_update(&resources, sb.state().vcpus).and_then(|l| vm.update(&l)),
                (None, None) => Ok(()),
            };
            updated.map_err(|e| internal(format!("update {}: {e}", req.id)))
        })
        .await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> RpcResult<WaitResponse> {
        let mut rx = self.0.with_proc(&req.id, &req.exec_id, |p| p.exit.subscribe())?;
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| not_found(format!("{} {}: gone", req.id, req.exec_id)))?
            .expect("waited for Some");
        Ok(WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> RpcResult<StatsResponse> {
        self.0.with_proc(&req.id, "", |_| ())?;
        let agent = self.0.agent()?;
        let s = blocking(move || agent.stats_container(&req.id).map_err(internal)).await?;
        Ok(StatsResponse {
            stats: MessageField::some(to_any(&metrics(&s))),
            ..Default::default()
        })
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> RpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: self.0.pid,
            task_pid: self.0.pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> RpcResult<Empty> {
        // The pod ends with its sandbox container (containerd deletes it
        // last), when nothing is left, or when told to now.
        let end = {
            let st = lock(&self.0.state);
            let sandbox_gone = st
                .pod
                .as_ref()
                .is_none_or(|p| p.id == req.id && !st.containers.contains_key(&p.id));
            req.now || st.containers.is_empty() || sandbox_gone
        };
        if !end {
            return Ok(Empty::new());
        }
        // The blocking task runs to its end even when containerd stops
        // waiting (its Shutdown times out after 3 s and the connection
        // closes, which drops this handler): so the shim's end is decided
        // in there, whatever happened to the VM.
        let inner = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.shutdown_pod()));
            if ended.is_err() {
                tracing::error!("shutdown: tearing the pod down panicked");
            }
            inner.shutdown.notify_one();
        });
        task.await.map_err(internal)?;
        Ok(Empty::new())
    }
}

fn init_logging(debug: bool) {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    // containerd reads `<bundle>/log` (a FIFO, opened by it first).
    let log = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok();
    let Some(log) = log else { return };
    // Writes stay non-blocking: when containerd stops reading (it is being
    // restarted), lines are dropped rather than the shim stalled.
    std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
    let level = if debug { "debug" } else { "info" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .try_init();
}

/// Serves the task API on the listening socket `fd` until Shutdown.
pub fn run(flags: Flags, fd: RawFd, socket: &Path) -> i32 {
    init_logging(flags.debug);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("tokio: {e}");
            return 1;
        }
    };
    let _ = std::env::set_current_dir("/");
    let code = runtime.block_on(async move {
        let shutdown = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            events: Publisher::start(&flags.namespace, std::env::var("TTRPC_ADDRESS").ok()),
            flags,
            pid: std::process::id(),
            state: Mutex::new(State::default()),
            shutdown: shutdown.clone(),
        });
        let service = Service(inner.clone());
        // SAFETY: `start` handed this listening socket over; nothing else uses it.
        let server = unsafe { ttrpc::asynchronous::Server::new().add_unix_listener(fd) };
        let mut server = match server {
            Ok(s) => s.register_service(create_task(Arc::new(service))),
            Err(e) => {
                tracing::error!("serving on {}: {e}", socket.display());
                return 1;
            }
        };
        if let Err(e) = server.start().await {
            tracing::error!("serving on {}: {e}", socket.display());
            return 1;
        }
        tracing::info!(namespace = inner.flags.namespace, id = inner.flags.id, "shim serving");
        shutdown.notified().await;
        tracing::info!("shutting down");
        // Whatever still holds the runtime (a connection of a containerd
        // that died, a blocked log write), the shim ends: containerd waits
        // for its exit.
        let socket_path = socket.to_path_buf();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(5));
            let _ = std::fs::remove_file(&socket_path);
            let _ = std::fs::remove_file(super::pid_file_of(&socket_path));
            // SAFETY: ending the process without running destructors.
            unsafe { libc::_exit(0) };
        });
        // Let the Shutdown reply reach containerd.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // A connection of a containerd that died may never drain.
        if tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the ttrpc server did not stop within 2 s; exiting anyway");
        }
        0
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
