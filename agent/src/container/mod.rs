//! The agent's container layer: real OCI containers (namespaces, cgroup v2,
//! pivot_root, seccomp, ...) made by youki's `libcontainer`, with the
//! lifecycle of runc — create (stopped before the user's program runs),
//! start, exec, kill, pause/resume, update, delete — plus what a runtime
//! around it needs: every process's stdio (pipes, or a pty), its exit status
//! as a shell reports it, and exit and OOM events as they happen.
//!
//! [`ContainerManager`] owns every container of the agent. It is used from
//! many threads at once (ttrpc handlers, the stdio transport, the reaper);
//! each container has a lock that serialises its lifecycle operations, and
//! waits never hold one. Exit statuses come from the agent's reaper, which
//! reaps every child (it has to, as PID 1) and hands each to
//! [`ContainerManager::child_exited`]. The container processes are the
//! agent's children: libcontainer creates them with `CLONE_PARENT` from a
//! forked helper (see `helper`).
//!
//! Locks are always taken in this order: a container's operation lock, then
//! [`FORK_LOCK`], then the manager's maps, then a container's state, then a
//! process's state. The reaper takes only `FORK_LOCK` (exclusively) and then
//! the maps.

mod cgroup;
mod debug;
mod devdir;
mod error;
mod helper;
pub mod loopback;
mod spec;
mod stdio;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::LinuxResources;

#[allow(unused_imports)] // DebugCommand: for the service, not the container tests
pub use debug::{DebugCommand, DEBUG_CONTAINER};
pub use error::ContainerError;
use error::Failure;

/// Held for reading while a child of the agent is created and waited for
/// by pid (libcontainer's helper, see `helper`), and while a fresh container
/// process is registered; held exclusively by the reaper around each round
/// of `waitpid(-1)`. Without it the reaper could collect a process before
/// the code that made it waits for it or knows its pid (Kata's fork lock).
///
/// Anything else in the agent that starts a child and waits for it by pid
/// (`std::process::Command::status`, ...) must hold it for reading too.
/// Never take it twice in one thread: a waiting reaper blocks new readers.
pub static FORK_LOCK: RwLock<()> = RwLock::new(());

/// `FORK_LOCK` for reading (see there).
pub fn fork_lock_shared() -> RwLockReadGuard<'static, ()> {
    FORK_LOCK.read().unwrap_or_else(PoisonError::into_inner)
}

/// `FORK_LOCK` exclusively: for the reaper.
pub fn fork_lock_exclusive() -> RwLockWriteGuard<'static, ()> {
    FORK_LOCK.write().unwrap_or_else(PoisonError::into_inner)
}

/// A panic in one thread must not make every later use of a lock panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One stdio stream of a container process, as [`ContainerManager::take_stdio`] hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
    Tty,
}

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: i32,
    /// As a shell reports it: the exit code, or 128+N for death by signal N.
    pub exit_code: i32,
    pub exited_at: SystemTime,
}

/// A container's cgroup statistics. Values of controllers not enabled in
/// the cgroup read 0; limits that are not set read `u64::MAX`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage: u64,
    /// `u64::MAX`: no limit.
    pub memory_limit: u64,
    pub memory_max_usage: u64,
    pub oom_kills: u64,
    pub pids_current: u64,
    /// `u64::MAX`: no limit.
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// What the manager reports as it happens, on the channel given to
/// [`ContainerManager::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A container's init (`exec_id` empty) or exec'd process ended.
    Exit {
        id: String,
        exec_id: String,
        pid: i32,
        exit_code: i32,
        exited_at: SystemTime,
    },
    /// The kernel's OOM killer killed a process of the container.
    Oom { id: String },
}

/// A container's state as runc names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// A snapshot of one container (runc's `state`).
#[derive(Debug, Clone)]
#[allow(dead_code)] // bundle and cgroup: for a list call, not wired yet
pub struct ContainerState {
    pub id: String,
    /// The init's pid; 0 while it is being created.
    pub pid: i32,
    pub status: Status,
    /// The bundle the agent wrote (its config.json is the spec in use).
    pub bundle: PathBuf,
    /// The container's cgroup directory.
    pub cgroup: PathBuf,
    pub exec_ids: Vec<String>,
}

/// One process the manager started: a container's init or an exec.
struct Process {
    pid: i32,
    /// Empty for the init.
    exec_id: String,
    /// Opened before the process could be reaped: signals sent through it
    /// never reach another process that got the pid later.
    pidfd: Option<OwnedFd>,
    exit: Mutex<Option<ExitInfo>>,
    exited: Condvar,
    io: Mutex<ProcessIo>,
}

#[derive(Default)]
struct ProcessIo {
    terminal: bool,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    tty: Option<OwnedFd>,
    /// A duplicate of the pty master, kept to resize the terminal after the
    /// transport took `tty`.
    tty_control: Option<OwnedFd>,
    stdin_closed: bool,
}

impl Process {
    fn new(pid: i32, exec_id: &str, io: ProcessIo) -> Process {
        Process {
            pid,
            exec_id: exec_id.to_string(),
            pidfd: pidfd_open(pid),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            io: Mutex::new(io),
        }
    }

    fn exit(&self) -> Option<ExitInfo> {
        *lock(&self.exit)
    }

    /// "the init of container X" / "exec E of container X", for messages.
    fn describe(&self, id: &str) -> String {
        if id == DEBUG_CONTAINER {
            format!("debug exec {}", self.exec_id)
        } else if self.exec_id.is_empty() {
            format!("the init of container {id}")
        } else {
            format!("exec {} of container {id}", self.exec_id)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Creating,
    Created,
    Running,
    Paused,
}

struct Container {
    id: String,
    /// Serialises create/start/exec/pause/resume/update/remove.
    op: Mutex<()>,
    state: Mutex<ContainerInner>,
}

struct ContainerInner {
    phase: Phase,
    bundle: PathBuf,
    /// linux.cgroupsPath as libcontainer uses it, and the directory it names.
    cgroups_path: PathBuf,
    cgroup_dir: PathBuf,
    init: Option<Arc<Process>>,
    execs: HashMap<String, Arc<Process>>,
    /// The overlay on the rootfs's `/dev` when the spec mounts none there
    /// ([`devdir`]).
    dev: devdir::DevDir,
}

impl ContainerInner {
    fn status(&self) -> Status {
        if self.init.as_ref().is_some_and(|p| p.exit().is_some()) {
            return Status::Stopped;
        }
        match self.phase {
            Phase::Creating => Status::Creating,
            Phase::Created => Status::Created,
            Phase::Running => Status::Running,
            Phase::Paused => Status::Paused,
        }
    }
}

/// All containers of this agent (see the module documentation).
pub struct ContainerManager {
    /// libcontainer's root: one state directory per container.
    state_root: PathBuf,
    /// `<state_root>/@bundles/<id>`: the bundle (config.json) the agent
    /// writes for each container, beside its console and exec files. `@`
    /// cannot occur in a container id, so it never meets a state directory.
    bundles: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Live processes by pid, for the reaper.
    by_pid: Mutex<HashMap<i32, (String, Arc<Process>)>>,
    /// The debug console's processes by exec id ([`debug`]).
    debug: Mutex<HashMap<String, Arc<Process>>>,
    events: Mutex<Sender<Event>>,
    oom: cgroup::OomWatcher,
    /// Numbers the files of execs.
    seq: AtomicU64,
    /// The agent's root is the initramfs itself (it is the guest's /init):
    /// pivot_root(2) refuses to move the root of the mount tree, so
    /// containers enter their rootfs with MS_MOVE + chroot instead, as runc
    /// does with `--no-pivot`. Their own mount namespace hides the
    /// initramfs beneath.
    no_pivot: bool,
}

/// How long `remove` waits for the killed processes to be reaped.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

fn fail(e: LibcontainerError) -> Failure {
    Failure::from_libcontainer(&e)
}

/// libcontainer's builder for container `id` under `root`, with the
/// process's stdio: the pipes' child ends, or a console socket for a pty.
fn builder(
    id: String,
    root: PathBuf,
    console: Option<PathBuf>,
    pipes: Option<stdio::ChildPipes>,
) -> Result<ContainerBuilder, Failure> {
    let mut builder = ContainerBuilder::new(id, SyscallType::Linux)
        .with_root_path(root)
        .map_err(fail)?
        .with_console_socket(console);
    if let Some(p) = pipes {
        builder = builder.with_stdin(p.stdin).with_stdout(p.stdout).with_stderr(p.stderr);
    }
    builder.validate_id().map_err(fail)
}

impl ContainerManager {
    /// `state_root`: libcontainer's root dir (e.g. /run/tegmen/containers);
    /// `events`: where exits and OOM kills go as they happen.
    pub fn new(state_root: PathBuf, events: Sender<Event>) -> Result<Self, ContainerError> {
        let bundles = state_root.join("@bundles");
        std::fs::create_dir_all(&bundles)
            .map_err(|e| ContainerError::io(format!("creating {}", bundles.display()), e))?;
        let state_root = state_root
            .canonicalize()
            .map_err(|e| ContainerError::io(format!("state root {}", state_root.display()), e))?;
        let bundles = state_root.join("@bundles");
        Ok(ContainerManager {
            state_root,
            bundles,
            containers: Mutex::new(HashMap::new()),
            by_pid: Mutex::new(HashMap::new()),
            debug: Mutex::new(HashMap::new()),
            oom: cgroup::OomWatcher::new(events.clone())?,
            events: Mutex::new(events),
            seq: AtomicU64::new(1),
            no_pivot: root_is_mount_tree_root(),
        })
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::not_found(id))
    }

    /// The init (`exec_id` None or "") or an exec of the container.
    /// [`DEBUG_CONTAINER`] names the debug console's processes.
    fn process(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<Process>, ContainerError> {
        if id == DEBUG_CONTAINER {
            return self.debug_process(exec_id);
        }
        let ctr = self.get(id)?;
        let st = lock(&ctr.state);
        match exec_id.filter(|e| !e.is_empty()) {
            None => st
                .init
                .clone()
                .ok_or_else(|| ContainerError::wrong_state(id, format!("container {id} is being created"))),
            Some(exec_id) => st
                .execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| ContainerError::NotFound(format!("exec {exec_id} does not exist in container {id}"))),
        }
    }

    /// Creates the container stopped before the user process runs (like
    /// `runc create`); `spec_json` is the OCI config.json text, `rootfs` an
    /// existing directory (overrides spec.root.path), `terminal` true => a
    /// pty whose slave is the process's stdio. Returns the init's pid.
    pub fn create(&self, id: &str, spec_json: &str, rootfs: &Path, terminal: bool) -> Result<i32, ContainerError> {
        spec::validate_id(id)?;
        let prepared = spec::prepare_container(id, spec_json, rootfs, terminal)?;
        let loopback_up = prepared
            .spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(loopback::LOOPBACK_ANNOTATION))
            .is_some_and(|v| v == "up");
        let bundle = self.bundles.join(id);
        let ctr = {
            let mut map = lock(&self.containers);
            if map.contains_key(id) {
                return Err(ContainerError::AlreadyExists(format!("container {id} already exists")));
            }
            let ctr = Arc::new(Container {
                id: id.to_string(),
                op: Mutex::new(()),
                state: Mutex::new(ContainerInner {
                    phase: Phase::Creating,
                    bundle: bundle.clone(),
                    cgroups_path: PathBuf::new(),
                    cgroup_dir: prepared.cgroup_dir.clone(),
                    init: None,
                    execs: HashMap::new(),
                    dev: devdir::DevDir::default(),
                }),
            });
            map.insert(id.to_string(), ctr.clone());
            ctr
        };
        let _op = lock(&ctr.op);
        let result = self.create_locked(&ctr, prepared, &bundle, terminal);
        if result.is_err() {
            // libcontainer removes what a failed create made; a helper that
            // was killed (timeout) could not, and its state would make the
            // id unusable.
            if lock(&ctr.state).init.is_none() && self.state_root.join(id).exists() {
                let _ = self.delete_state(id);
            }
            lock(&ctr.state).dev.undo();
            let mut map = lock(&self.containers);
            if map.get(id).is_some_and(|c| Arc::ptr_eq(c, &ctr)) {
                map.remove(id);
            }
            drop(map);
            let _ = std::fs::remove_dir_all(&bundle);
        }
        if let Ok(pid) = &result {
            log::info!("container {id} created, init pid {pid}");
        }
        if let (Ok(pid), true) = (&result, loopback_up) {
            if let Err(e) = loopback::bring_up(*pid) {
                let _ = self.remove(id, true);
                return Err(ContainerError::io(format!("container {id}: bringing up lo"), e));
            }
        }
        result
    }

    fn create_locked(
        &self,
        ctr: &Container,
        prepared: spec::Prepared,
        bundle: &Path,
        terminal: bool,
    ) -> Result<i32, ContainerError> {
        let id = ctr.id.as_str();
        if !cgroup2_mounted() {
            return Err(ContainerError::Libcontainer(format!(
                "cannot create container {id}: cgroup v2 is not mounted at {} (on a host with hybrid or v1 \
                 cgroups, see container::mount_private_cgroup2)",
                spec::CGROUP_ROOT
            )));
        }
        if self.state_root.join(id).exists() {
            return Err(ContainerError::AlreadyExists(format!(
                "container {id} already exists (state directory {} is left from an earlier agent)",
                self.state_root.join(id).display()
            )));
        }
        let _ = std::fs::remove_dir_all(bundle);
        std::fs::create_dir_all(bundle).map_err(|e| ContainerError::io(format!("creating {}", bundle.display()), e))?;
        let config =
            serde_json::to_vec_pretty(&prepared.spec).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), config)
            .map_err(|e| ContainerError::io(format!("writing {}/config.json", bundle.display()), e))?;
        let cgroups_path = prepared
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .unwrap_or_default();
        let console_size = prepared.spec.process().as_ref().and_then(|p| p.console_size());
        let propagation = spec::mount_propagation(&prepared.spec);

        let dev = devdir::prepare(&prepared.spec, bundle)?;
        let dev_readonly = dev.overlay.is_some() && dev.readonly;
        lock(&ctr.state).dev = dev;
        let mut io = StdioSetup::new(terminal, &bundle.join("console.sock"))?;
        let child = io.child.take();
        let console_path = io.console.as_ref().map(|c| c.path().to_path_buf());
        let (root, id_owned, bundle_owned) = (self.state_root.clone(), id.to_string(), bundle.to_path_buf());
        let no_pivot = self.no_pivot;

        let fork_guard = fork_lock_shared();
        let pid = helper::run("create container", id, move || {
            let container = builder(id_owned, root, console_path, child)?
                .as_init(bundle_owned)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(no_pivot)
                .as_sibling(true)
                .build()
                .map_err(fail)?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| Failure::other("libcontainer reported no pid for the init"))
        });
        let pid = pid?;
        // Registered while FORK_LOCK is held: the reaper cannot have
        // collected the init yet, however quickly it died.
        let mut pio = ProcessIo {
            terminal,
            ..Default::default()
        };
        let received = io.finish(&mut pio);
        let init = Arc::new(Process::new(pid, "", pio));
        lock(&self.by_pid).insert(pid, (id.to_string(), init.clone()));
        drop(fork_guard);
        {
            let mut st = lock(&ctr.state);
            st.init = Some(init.clone());
            st.cgroups_path = cgroups_path;
        }
        if let Err(e) = received {
            // The container exists but its terminal is lost: remove it.
            let _ = self.destroy(ctr);
            return Err(e);
        }
        if let Some(size) = console_size {
            if let Some(master) = lock(&init.io).tty_control.as_ref() {
                let _ = stdio::set_window_size(master, size.height() as u16, size.width() as u16);
            }
        }
        let cgroup_dir = {
            let mut st = lock(&ctr.state);
            st.phase = Phase::Created;
            st.cgroup_dir.clone()
        };
        self.oom.add(id, &cgroup_dir);
        if dev_readonly {
            let made = {
                let _fork = fork_lock_shared();
                helper::run("make /dev read-only in", id, move || {
                    devdir::make_readonly_in(pid).map(|()| 0)
                })
            };
            if let Err(e) = made {
                let _ = self.destroy(ctr);
                return Err(e);
            }
        }
        if !propagation.is_empty() {
            let applied = {
                let _fork = fork_lock_shared();
                helper::run("set mount propagation in", id, move || {
                    spec::apply_mount_propagation(pid, &propagation).map(|()| 0)
                })
            };
            if let Err(e) = applied {
                let _ = self.destroy(ctr);
                return Err(e);
            }
        }
        Ok(pid)
    }

    /// Lets the init run the user's program (like `runc start`).
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        match lock(&ctr.state).status() {
            Status::Created => {}
            Status::Running | Status::Paused => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("cannot start container {id}: it is already running"),
                ))
            }
            Status::Stopped => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("cannot start container {id}: it has stopped"),
                ))
            }
            Status::Creating => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("container {id} is being created"),
                ))
            }
        }
        let (root, id_owned) = (self.state_root.clone(), id.to_string());
        {
            let _fork = fork_lock_shared();
            helper::run("start container", id, move || {
                let mut c = LcContainer::load(root.join(&id_owned)).map_err(fail)?;
                c.start().map_err(fail)?;
                Ok(0)
            })?;
        }
        lock(&ctr.state).phase = Phase::Running;
        Ok(())
    }

    /// Runs an extra process in a running container; `process_json` is an
    /// OCI `process` object. Returns its pid once it runs the program.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &str, terminal: bool) -> Result<i32, ContainerError> {
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "an exec needs a non-empty exec id".into(),
            ));
        }
        let process = spec::prepare_process(process_json, terminal)?;
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        let bundle = {
            let st = lock(&ctr.state);
            match st.status() {
                Status::Running => {}
                Status::Paused => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("cannot exec in container {id}: it is paused"),
                    ))
                }
                Status::Created => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("cannot exec in container {id}: it is not running (created, not started)"),
                    ))
                }
                Status::Stopped => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("cannot exec in container {id}: it has stopped"),
                    ))
                }
                Status::Creating => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("container {id} is being created"),
                    ))
                }
            }
            if st.execs.contains_key(exec_id) {
                return Err(ContainerError::AlreadyExists(format!(
                    "exec {exec_id} already exists in container {id}"
                )));
            }
            st.bundle.clone()
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let process_file = bundle.join(format!("exec-{n}.json"));
        let text = serde_json::to_vec(&process).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        std::fs::write(&process_file, text)
            .map_err(|e| ContainerError::io(format!("writing {}", process_file.display()), e))?;
        let io = StdioSetup::new(terminal, &bundle.join(format!("exec-{n}.sock")));
        let mut io = match io {
            Ok(io) => io,
            Err(e) => {
                let _ = std::fs::remove_file(&process_file);
                return Err(e);
            }
        };
        let child = io.child.take();
        let console_path = io.console.as_ref().map(|c| c.path().to_path_buf());
        let (root, id_owned, file) = (self.state_root.clone(), id.to_string(), process_file.clone());

        let fork_guard = fork_lock_shared();
        let result = helper::run("exec in container", id, move || {
            let pid = builder(id_owned, root, console_path, child)?
                .as_tenant()
                .with_detach(true)
                .as_sibling(true)
                .with_process(Some(file))
                .build()
                .map_err(fail)?;
            Ok(pid.as_raw())
        });
        let _ = std::fs::remove_file(&process_file);
        let pid = result?;
        let mut pio = ProcessIo {
            terminal,
            ..Default::default()
        };
        let received = io.finish(&mut pio);
        let proc = Arc::new(Process::new(pid, exec_id, pio));
        lock(&self.by_pid).insert(pid, (id.to_string(), proc.clone()));
        drop(fork_guard);
        lock(&ctr.state).execs.insert(exec_id.to_string(), proc.clone());
        if let Err(e) = received {
            // The process runs but its terminal is lost: end it.
            let _ = send_signal(&proc, libc::SIGKILL);
            return Err(e);
        }
        if let Some(size) = process.console_size() {
            if let Some(master) = lock(&proc.io).tty_control.as_ref() {
                let _ = stdio::set_window_size(master, size.height() as u16, size.width() as u16);
            }
        }
        Ok(pid)
    }

    /// Sends `signal` to the init (`exec_id` None or "") or an exec; with
    /// `all`, to every process of the container.
    pub fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<(), ContainerError> {
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return Err(ContainerError::InvalidArgument(format!("invalid signal {signal}")));
        }
        if all && id == DEBUG_CONTAINER {
            // A debug process leads a session of its own: all of it.
            let proc = self.debug_process(exec_id)?;
            // With FORK_LOCK the leader cannot be reaped (and its pid
            // reused) between the look and the kill.
            let _fork = fork_lock_shared();
            if proc.exit().is_none() {
                // SAFETY: kill(2) with a process group and a signal number.
                unsafe { libc::kill(-proc.pid, signal) };
            }
            return Ok(());
        }
        if all {
            let ctr = self.get(id)?;
            let (status, dir) = {
                let st = lock(&ctr.state);
                (st.status(), st.cgroup_dir.clone())
            };
            if status == Status::Creating {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("container {id} is being created"),
                ));
            }
            if !dir.exists() {
                return Ok(());
            }
            return cgroup::signal_all(&dir, signal);
        }
        let proc = self.process(id, exec_id)?;
        let gone = || {
            if proc.exec_id.is_empty() {
                ContainerError::wrong_state(id, format!("container {id} is not running"))
            } else {
                ContainerError::wrong_state(id, format!("{} has already exited", proc.describe(id)))
            }
        };
        if proc.exit().is_some() {
            return Err(gone());
        }
        match send_signal(&proc, signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(gone()),
            Err(e) => Err(ContainerError::io(
                format!("sending signal {signal} to {}", proc.describe(id)),
                e,
            )),
        }
    }

    /// Blocks until that process has exited (returns at once if it already
    /// has); may be called many times, before or after the exit.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo, ContainerError> {
        let proc = self.process(id, exec_id)?;
        let mut exit = lock(&proc.exit);
        loop {
            if let Some(info) = *exit {
                return Ok(info);
            }
            exit = proc.exited.wait(exit).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The pids in the container's cgroup (and the cgroups below it).
    pub fn processes(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        let ctr = self.get(id)?;
        let dir = lock(&ctr.state).cgroup_dir.clone();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        cgroup::pids(&dir)
    }

    /// The container's statistics, from its cgroup v2 files.
    pub fn stats(&self, id: &str) -> Result<Stats, ContainerError> {
        let ctr = self.get(id)?;
        let dir = lock(&ctr.state).cgroup_dir.clone();
        Ok(cgroup::stats(&dir))
    }

    /// Freezes every process of a running container (cgroup freezer).
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        match lock(&ctr.state).status() {
            Status::Running => {}
            Status::Paused => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("container {id} is already paused"),
                ))
            }
            _ => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("container {id} is not running"),
                ))
            }
        }
        let mut c = LcContainer::load(self.state_root.join(id)).map_err(|e| fail(e).into_error(id))?;
        c.pause().map_err(|e| fail(e).into_error(id))?;
        lock(&ctr.state).phase = Phase::Paused;
        Ok(())
    }

    /// Thaws a paused container.
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        if lock(&ctr.state).status() != Status::Paused {
            return Err(ContainerError::wrong_state(id, format!("container {id} is not paused")));
        }
        let mut c = LcContainer::load(self.state_root.join(id)).map_err(|e| fail(e).into_error(id))?;
        c.resume().map_err(|e| fail(e).into_error(id))?;
        lock(&ctr.state).phase = Phase::Running;
        Ok(())
    }

    /// Applies an OCI `linux.resources` object to the container's cgroup.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), ContainerError> {
        let resources: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("linux.resources: {e}")))?;
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        let cgroups_path = {
            let st = lock(&ctr.state);
            match st.status() {
                Status::Created | Status::Running | Status::Paused => st.cgroups_path.clone(),
                Status::Stopped => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("container {id} is not running"),
                    ))
                }
                Status::Creating => {
                    return Err(ContainerError::wrong_state(
                        id,
                        format!("container {id} is being created"),
                    ))
                }
            }
        };
        cgroup::update(&cgroups_path, &resources)
    }

    /// Sets the window size of the process's terminal.
    pub fn resize_tty(&self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let proc = self.process(id, exec_id)?;
        let io = lock(&proc.io);
        let Some(master) = io.tty_control.as_ref() else {
            return Err(ContainerError::InvalidArgument(format!(
                "{} has no terminal",
                proc.describe(id)
            )));
        };
        stdio::set_window_size(master, rows, cols)
            .map_err(|e| ContainerError::io(format!("resizing the terminal of {}", proc.describe(id)), e))
    }

    /// Closes the process's stdin, so it reads EOF, if the agent still holds
    /// the write end. Once the transport took it ([`StdioStream::Stdin`]),
    /// the transport closes it by dropping its descriptor. With a terminal
    /// there is no separate stdin to close: this does nothing.
    pub fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), ContainerError> {
        let proc = self.process(id, exec_id)?;
        let mut io = lock(&proc.io);
        io.stdin = None;
        io.stdin_closed = true;
        Ok(())
    }

    /// Hands out the agent's end of one stdio stream, once: Stdin = write
    /// end of the process's stdin pipe, Stdout/Stderr = read ends, Tty = the
    /// pty master (only with a terminal; read it until EIO, which means the
    /// process side closed).
    pub fn take_stdio(&self, id: &str, exec_id: Option<&str>, stream: StdioStream) -> Result<OwnedFd, ContainerError> {
        let proc = self.process(id, exec_id)?;
        let mut io = lock(&proc.io);
        let who = proc.describe(id);
        let slot = match (io.terminal, stream) {
            (true, StdioStream::Tty) => &mut io.tty,
            (false, StdioStream::Tty) => {
                return Err(ContainerError::InvalidArgument(format!(
                    "{who} has no terminal: take its stdin, stdout and stderr"
                )))
            }
            (true, _) => {
                return Err(ContainerError::InvalidArgument(format!(
                    "{who} has a terminal: its stdio is the tty stream"
                )))
            }
            (false, StdioStream::Stdin) if io.stdin_closed => {
                return Err(ContainerError::wrong_state(id, format!("the stdin of {who} is closed")))
            }
            (false, StdioStream::Stdin) => &mut io.stdin,
            (false, StdioStream::Stdout) => &mut io.stdout,
            (false, StdioStream::Stderr) => &mut io.stderr,
        };
        slot.take()
            .ok_or_else(|| ContainerError::wrong_state(id, format!("the {stream:?} stream of {who} was already taken")))
    }

    /// Removes a stopped (or created) container; `force` kills a running or
    /// paused one first. Leaves no mounts, cgroups, processes or state.
    pub fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let ctr = self.get(id)?;
        let _op = lock(&ctr.op);
        let status = lock(&ctr.state).status();
        match status {
            Status::Running | Status::Paused if !force => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("cannot delete container {id} that is not stopped: {status}"),
                ))
            }
            Status::Creating => {
                return Err(ContainerError::wrong_state(
                    id,
                    format!("container {id} is being created"),
                ))
            }
            _ => {}
        }
        self.destroy(&ctr)?;
        lock(&self.containers).remove(id);
        Ok(())
    }

    /// Kills whatever is left of the container, waits for its processes to
    /// be reaped, and has libcontainer delete it (cgroup, state directory,
    /// poststop hooks); then removes the agent's bundle. The caller holds
    /// the container's operation lock.
    fn destroy(&self, ctr: &Container) -> Result<(), ContainerError> {
        let id = ctr.id.as_str();
        let (dir, bundle, procs) = {
            let st = lock(&ctr.state);
            let procs: Vec<Arc<Process>> = st.init.iter().chain(st.execs.values()).cloned().collect();
            (st.cgroup_dir.clone(), st.bundle.clone(), procs)
        };
        if dir.exists() {
            cgroup::signal_all(&dir, libc::SIGKILL)?;
        }
        let deadline = Instant::now() + REMOVE_WAIT;
        for p in &procs {
            if p.exit().is_none() {
                let _ = send_signal(p, libc::SIGKILL);
            }
            let mut exit = lock(&p.exit);
            while exit.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ContainerError::Libcontainer(format!(
                        "removing container {id}: {} (pid {}) did not end within {}s of SIGKILL",
                        p.describe(id),
                        p.pid,
                        REMOVE_WAIT.as_secs()
                    )));
                }
                exit = p
                    .exited
                    .wait_timeout(exit, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        cgroup::wait_empty(&dir, deadline);
        self.oom.remove(id);
        if self.state_root.join(id).exists() {
            self.delete_state(id)?;
        }
        if dir.exists() {
            std::fs::remove_dir(&dir)
                .map_err(|e| ContainerError::io(format!("removing cgroup {}", dir.display()), e))?;
        }
        lock(&ctr.state).dev.undo();
        let _ = std::fs::remove_dir_all(&bundle);
        Ok(())
    }

    /// Has libcontainer delete the container (kill what is left, remove
    /// the cgroup and the state directory, run poststop hooks). The caller
    /// must not hold `FORK_LOCK`.
    fn delete_state(&self, id: &str) -> Result<(), ContainerError> {
        let (root, id_owned) = (self.state_root.clone(), id.to_string());
        let _fork = fork_lock_shared();
        helper::run("delete container", id, move || {
            let mut c = LcContainer::load(root.join(&id_owned)).map_err(fail)?;
            c.delete(true).map_err(fail)?;
            Ok(0)
        })?;
        Ok(())
    }

    /// Forgets an exec that has exited (containerd's "delete" of an exec
    /// process): its record and whatever stdio the transport did not take.
    /// The exec id can be used again afterwards.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if id == DEBUG_CONTAINER {
            return self.remove_debug(exec_id);
        }
        let ctr = self.get(id)?;
        let mut st = lock(&ctr.state);
        let Some(proc) = st.execs.get(exec_id) else {
            return Err(ContainerError::NotFound(format!(
                "exec {exec_id} does not exist in container {id}"
            )));
        };
        if proc.exit().is_none() {
            return Err(ContainerError::wrong_state(
                id,
                format!("cannot remove exec {exec_id} of container {id}: it is running"),
            ));
        }
        st.execs.remove(exec_id);
        Ok(())
    }

    /// Must be called by the agent's reaper for every child it reaps (pid,
    /// raw wait status): the manager matches it to its processes.
    pub fn child_exited(&self, pid: i32, status: i32) {
        let Some((id, proc)) = lock(&self.by_pid).remove(&pid) else {
            return;
        };
        let exit_code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            // Stopped/continued are not reported without WUNTRACED; keep
            // the process registered in case one shows up anyway.
            lock(&self.by_pid).insert(pid, (id, proc));
            return;
        };
        let info = ExitInfo {
            pid,
            exit_code,
            exited_at: SystemTime::now(),
        };
        *lock(&proc.exit) = Some(info);
        proc.exited.notify_all();
        if id == DEBUG_CONTAINER {
            // The operator's own process: on the console, not an event of
            // any container.
            log::info!(
                "debug console: exec {} (pid {pid}) exited with status {exit_code}",
                proc.exec_id
            );
            return;
        }
        if proc.exec_id.is_empty() {
            // On the console, for operators (`supervisor console`).
            log::info!("container {id}: init (pid {pid}) exited with status {exit_code}");
        }
        let _ = lock(&self.events).send(Event::Exit {
            id,
            exec_id: proc.exec_id.clone(),
            pid,
            exit_code,
            exited_at: info.exited_at,
        });
    }

    /// A snapshot of the container's state.
    pub fn state(&self, id: &str) -> Result<ContainerState, ContainerError> {
        let ctr = self.get(id)?;
        let st = lock(&ctr.state);
        let mut exec_ids: Vec<String> = st.execs.keys().cloned().collect();
        exec_ids.sort();
        Ok(ContainerState {
            id: id.to_string(),
            pid: st.init.as_ref().map(|p| p.pid).unwrap_or(0),
            status: st.status(),
            bundle: st.bundle.clone(),
            cgroup: st.cgroup_dir.clone(),
            exec_ids,
        })
    }

    /// The ids of all containers, sorted.
    #[allow(dead_code)] // for the service layer, not wired yet
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// The stdio of a process being made: pipes, or a console socket.
struct StdioSetup {
    agent: Option<stdio::AgentPipes>,
    child: Option<stdio::ChildPipes>,
    console: Option<stdio::ConsoleSocket>,
}

impl StdioSetup {
    fn new(terminal: bool, console_path: &Path) -> Result<StdioSetup, ContainerError> {
        if terminal {
            let console = stdio::ConsoleSocket::bind(console_path)
                .map_err(|e| ContainerError::io(format!("binding {}", console_path.display()), e))?;
            Ok(StdioSetup {
                agent: None,
                child: None,
                console: Some(console),
            })
        } else {
            let (agent, child) = stdio::pipes().map_err(|e| ContainerError::io("creating stdio pipes", e))?;
            Ok(StdioSetup {
                agent: Some(agent),
                child: Some(child),
                console: None,
            })
        }
    }

    /// Moves the agent's ends into `io`; with a terminal, receives the pty
    /// master the new process sent.
    fn finish(self, io: &mut ProcessIo) -> Result<(), ContainerError> {
        if let Some(p) = self.agent {
            io.stdin = Some(p.stdin);
            io.stdout = Some(p.stdout);
            io.stderr = Some(p.stderr);
        }
        if let Some(console) = self.console {
            let master = console
                .receive_master()
                .map_err(|e| ContainerError::io("receiving the pty master from the console socket", e))?;
            io.tty_control = Some(
                master
                    .try_clone()
                    .map_err(|e| ContainerError::io("duplicating the pty master", e))?,
            );
            io.tty = Some(master);
        }
        Ok(())
    }
}

/// Whether cgroup v2 is mounted at /sys/fs/cgroup, where libcontainer
/// looks for it.
fn cgroup2_mounted() -> bool {
    const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;
    nix::sys::statfs::statfs(spec::CGROUP_ROOT).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// For the agent on a host whose /sys/fs/cgroup is not cgroup v2 (a hybrid
/// v1/v2 host has v2 at /sys/fs/cgroup/unified): moves the process into a
/// private mount namespace and mounts cgroup v2 on /sys/fs/cgroup there,
/// leaving the host's mounts as they are. Returns whether it did.
///
/// Call it before the process starts any thread: a mount namespace made
/// later would be the calling thread's alone. Never needed in the guest.
#[allow(dead_code)] // for main.rs on a host agent, not wired yet
pub fn mount_private_cgroup2() -> Result<bool, ContainerError> {
    use nix::mount::{mount, MsFlags};
    if cgroup2_mounted() {
        return Ok(false);
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| ContainerError::io("unshare(CLONE_NEWNS)", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| ContainerError::io("making / rprivate", e.into()))?;
    mount(
        Some("cgroup2"),
        spec::CGROUP_ROOT,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| ContainerError::io(format!("mounting cgroup2 on {}", spec::CGROUP_ROOT), e.into()))?;
    Ok(true)
}

/// Whether `/` is the root of the mount tree (the initramfs, never
/// switched away from): its mountinfo line is its own parent, or has the
/// type `rootfs`.
fn root_is_mount_tree_root() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // The last mount on "/" is the one in use.
    let Some(line) = info.lines().rev().find(|l| l.split_whitespace().nth(4) == Some("/")) else {
        return false;
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let fstype = line.split(" - ").nth(1).and_then(|rest| rest.split_whitespace().next());
    fields.first() == fields.get(1) || fstype == Some("rootfs")
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor is new and owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Signals exactly that process: through its pidfd, else by pid.
fn send_signal(proc: &Process, signal: i32) -> std::io::Result<()> {
    let rc = match &proc.pidfd {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no
        // siginfo and no flags.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) as i32
        },
        // SAFETY: kill(2) with a pid and a signal number.
        None => unsafe { libc::kill(proc.pid, signal) },
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
