//! The agent API service: answers the supervisor's ttrpc requests.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tegmen_agent_api::agent::*;
use tegmen_agent_api::agent_ttrpc::Agent;
use tegmen_agent_api::API_VERSION;
use ttrpc::TtrpcContext;

use crate::container::{self, ContainerError, ContainerManager, StdioStream};
use crate::guest;

/// Longest a watcher's `GetEvent` waits for an event.
const MAX_EVENT_WAIT_MS: u32 = 60_000;

pub struct AgentService {
    /// True when the agent is the guest's PID 1 (Shutdown powers off).
    as_init: bool,
    /// The shared directory (the virtio-fs mount in the guest).
    shared_dir: PathBuf,
    containers: Arc<ContainerManager>,
    events: Arc<crate::eventhub::EventHub>,
    /// `ExecDebug` is served (the guest was booted with the debug console).
    debug_console: bool,
}

impl AgentService {
    pub fn new(
        as_init: bool,
        shared_dir: PathBuf,
        containers: Arc<ContainerManager>,
        events: Arc<crate::eventhub::EventHub>,
        debug_console: bool,
    ) -> Self {
        Self {
            as_init,
            shared_dir,
            containers,
            events,
            debug_console,
        }
    }

    /// `rootfs` must name a directory inside the shared directory: relative,
    /// no `..`, and no symlink leading out of it.
    fn resolve_rootfs(&self, rootfs: &str) -> ttrpc::Result<PathBuf> {
        let rel = Path::new(rootfs);
        if rootfs.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("rootfs {rootfs:?} must be a relative path inside the shared directory, without '..'"),
            ));
        }
        let base = self.shared_dir.canonicalize().map_err(|e| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("shared directory {}: {e}", self.shared_dir.display()),
            )
        })?;
        let full = base.join(rel).canonicalize().map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("rootfs {rootfs:?} in the shared directory: {e}"),
            )
        })?;
        if !full.starts_with(&base) || !full.is_dir() {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("rootfs {rootfs:?} is not a directory inside the shared directory"),
            ));
        }
        Ok(full)
    }
}

fn container_status(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        ContainerError::InvalidSpec(_)
        | ContainerError::InvalidArgument(_)
        | ContainerError::ExecutableNotFound(..) => ttrpc::Code::INVALID_ARGUMENT,
        ContainerError::WrongState { .. } => ttrpc::Code::FAILED_PRECONDITION,
        _ => ttrpc::Code::INTERNAL,
    };
    status(code, e.to_string())
}

fn exec_opt(exec_id: &str) -> Option<&str> {
    (!exec_id.is_empty()).then_some(exec_id)
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Without stdin the process reads EOF at once: its pipe's write end is
/// closed right away.
fn close_unused_stdin(containers: &ContainerManager, id: &str, exec_id: Option<&str>, stdin: bool, terminal: bool) {
    if !stdin && !terminal {
        drop(containers.take_stdio(id, exec_id, StdioStream::Stdin));
    }
}

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

impl Agent for AgentService {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let mut resp = CheckResponse::new();
        resp.uptime_seconds = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
            .unwrap_or(0.0);
        Ok(resp)
    }

    fn version(&self, _ctx: &TtrpcContext, _req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        resp.api_version = API_VERSION;
        Ok(resp)
    }

    fn guest_details(&self, _ctx: &TtrpcContext, _req: GuestDetailsRequest) -> ttrpc::Result<GuestDetailsResponse> {
        let mut resp = GuestDetailsResponse::new();
        resp.kernel_release = guest::kernel_release();
        resp.memory_total_bytes = guest::memory_total_bytes();
        resp.cpus = guest::online_cpus();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        resp.mounts = guest::mounts();
        resp.load_average = guest::load_average();
        resp.memory_available_bytes = guest::memory_available_bytes();
        resp.shared_mount = self.shared_dir.display().to_string();
        resp.sandbox_id = guest::sandbox_id(&self.shared_dir)
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, format!("sandbox id: {e}")))?;
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<ShutdownResponse> {
        if !self.as_init {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "shutdown: the agent is not the guest's init",
            ));
        }
        log::info!("shutdown requested: syncing and powering off");
        nix::unistd::sync();
        // Answer first, then end the VM: the reply must leave before the
        // guest goes away.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        });
        Ok(ShutdownResponse::new())
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let rootfs = self.resolve_rootfs(&req.rootfs)?;
        let id = &req.container_id;
        let pid = self
            .containers
            .create(id, &req.spec_json, &rootfs, req.terminal)
            .map_err(container_status)?;
        close_unused_stdin(&self.containers, id, None, req.stdin, req.terminal);
        let mut resp = CreateContainerResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.start(&req.container_id).map_err(container_status)?;
        Ok(Empty::new())
    }

    fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<ExecProcessResponse> {
        if req.exec_id.is_empty() {
            return Err(status(ttrpc::Code::INVALID_ARGUMENT, "exec id must not be empty"));
        }
        let (id, exec) = (&req.container_id, &req.exec_id);
        let pid = self
            .containers
            .exec(id, exec, &req.process_json, req.terminal)
            .map_err(container_status)?;
        close_unused_stdin(&self.containers, id, Some(exec), req.stdin, req.terminal);
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    fn exec_debug(&self, _ctx: &TtrpcContext, req: ExecDebugRequest) -> ttrpc::Result<ExecProcessResponse> {
        let size = (
            u16::try_from(req.rows).unwrap_or(u16::MAX),
            u16::try_from(req.cols).unwrap_or(u16::MAX),
        );
        let cmd = container::DebugCommand {
            exec_id: &req.exec_id,
            args: &req.args,
            env: &req.env,
            terminal: req.terminal,
            size,
        };
        let pid = self
            .containers
            .exec_debug(self.debug_console, &cmd)
            .map_err(container_status)?;
        close_unused_stdin(
            &self.containers,
            container::DEBUG_CONTAINER,
            Some(&req.exec_id),
            req.stdin,
            req.terminal,
        );
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, format!("invalid signal {}", req.signal)))?;
        self.containers
            .signal(&req.container_id, exec_opt(&req.exec_id), signal, req.all)
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self
            .containers
            .wait(&req.container_id, exec_opt(&req.exec_id))
            .map_err(container_status)?;
        let mut resp = WaitProcessResponse::new();
        resp.pid = exit.pid;
        resp.exit_code = exit.exit_code;
        resp.exited_at_unix_nanos = unix_nanos(exit.exited_at);
        Ok(resp)
    }

    fn list_processes(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        let mut resp = ListProcessesResponse::new();
        resp.pids = self.containers.processes(&req.container_id).map_err(container_status)?;
        resp.processes = resp.pids.iter().filter_map(|p| crate::procinfo::read(*p)).collect();
        Ok(resp)
    }

    fn container_state(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ContainerStateResponse> {
        let st = self.containers.state(&req.container_id).map_err(container_status)?;
        let mut resp = ContainerStateResponse::new();
        resp.status = st.status.to_string();
        resp.pid = st.pid;
        resp.exec_ids = st.exec_ids;
        Ok(resp)
    }

    fn stats_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ContainerStats> {
        let s = self.containers.stats(&req.container_id).map_err(container_status)?;
        let mut r = ContainerStats::new();
        r.cpu_usage_usec = s.cpu_usage_usec;
        r.cpu_user_usec = s.cpu_user_usec;
        r.cpu_system_usec = s.cpu_system_usec;
        r.cpu_nr_periods = s.cpu_nr_periods;
        r.cpu_nr_throttled = s.cpu_nr_throttled;
        r.cpu_throttled_usec = s.cpu_throttled_usec;
        r.memory_usage = s.memory_usage;
        r.memory_limit = s.memory_limit;
        r.memory_max_usage = s.memory_max_usage;
        r.oom_kills = s.oom_kills;
        r.pids_current = s.pids_current;
        r.pids_limit = s.pids_limit;
        r.io_read_bytes = s.io_read_bytes;
        r.io_write_bytes = s.io_write_bytes;
        Ok(r)
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id).map_err(container_status)?;
        Ok(Empty::new())
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.resume(&req.container_id).map_err(container_status)?;
        Ok(Empty::new())
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources_json)
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let rows = u16::try_from(req.rows).map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "rows out of range"))?;
        let cols = u16::try_from(req.cols).map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "cols out of range"))?;
        self.containers
            .resize_tty(&req.container_id, exec_opt(&req.exec_id), rows, cols)
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, exec_opt(&req.exec_id))
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn remove_process(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        if req.exec_id.is_empty() {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                "RemoveProcess needs an exec id: the init is removed with its container",
            ));
        }
        self.containers
            .remove_exec(&req.container_id, &req.exec_id)
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: RemoveContainerRequest) -> ttrpc::Result<Empty> {
        self.containers
            .remove(&req.container_id, req.force)
            .map_err(container_status)?;
        Ok(Empty::new())
    }

    fn configure_network(&self, _ctx: &TtrpcContext, req: ConfigureNetworkRequest) -> ttrpc::Result<Empty> {
        if !self.as_init {
            // The host-mode agent of the tests must not touch the host's.
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "configure network: the agent is not the guest's init",
            ));
        }
        crate::network::configure(&req).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, format!("network: {e}")))?;
        log::info!(
            "network: {} interface(s), {} route(s), {} neighbour(s)",
            req.interfaces.len(),
            req.routes.len(),
            req.neighbors.len()
        );
        Ok(Empty::new())
    }

    fn listening_ports(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<ListeningPortsResponse> {
        let mut resp = ListeningPortsResponse::new();
        resp.tcp = crate::ports::listening_ports().into_iter().map(u32::from).collect();
        Ok(resp)
    }

    fn get_event(&self, _ctx: &TtrpcContext, req: GetEventRequest) -> ttrpc::Result<Event> {
        let next = if req.watcher.is_empty() {
            self.events.next_primary()
        } else {
            let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_EVENT_WAIT_MS)));
            match self.events.next_for(&req.watcher, wait) {
                // Nothing happened within the wait: an event with none set.
                Ok(None) => return Ok(Event::new()),
                Ok(some) => some,
                Err(e) => return Err(status(ttrpc::Code::RESOURCE_EXHAUSTED, e)),
            }
        };
        let mut event = Event::new();
        match next.ok_or(()) {
            Ok(container::Event::Exit {
                id,
                exec_id,
                pid,
                exit_code,
                exited_at,
            }) => {
                let mut e = ExitEvent::new();
                e.container_id = id;
                e.exec_id = exec_id;
                e.pid = pid;
                e.exit_code = exit_code;
                e.exited_at_unix_nanos = unix_nanos(exited_at);
                event.set_exit(e);
            }
            Ok(container::Event::Oom { id }) => {
                let mut e = OomEvent::new();
                e.container_id = id;
                event.set_oom(e);
            }
            Err(_) => return Err(status(ttrpc::Code::UNAVAILABLE, "the event source has closed")),
        }
        Ok(event)
    }
}
