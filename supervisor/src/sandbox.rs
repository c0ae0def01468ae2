//! A sandbox: one VM, its directory on the host, and the agent inside it.
//!
//! Layout of `<root>/sandboxes/<id>/`:
//!
//! | file | what |
//! | --- | --- |
//! | `state.json` | [`SandboxState`]: status, owner, every host process |
//! | `vsock` | hybrid-vsock socket: the host's way to the agent (guest-initiated connections to port P reach `vsock_P`) |
//! | `vhost-vsock.sock`, `vhost-fs.sock`, `vhost-net<N>.sock` | vhost-user sockets of the backends (one net backend per NIC, its tap in the pod's network namespace) |
//! | `shared/` | the virtio-fs source, mounted in the guest at `/run/tegmen/shared`; a shared mount, so containers mounted below it later reach the backends' slave copies ([`crate::container`]) |
//! | `console.log` | the guest's serial console |
//! | `*-backend.log`, `qemu.log` | the host processes' own output |
//!
//! Teardown removes every process, socket, mount, directory, host cgroup
//! and tc redirect the sandbox made, on success, on error, and — through
//! [`cleanup_stale`] at the next start, or [`destroy`] — after the process
//! that owned it was killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tegmen_agent_api::{AGENT_VSOCK_PORT, SANDBOX_ID_FILE};

use crate::agent_client::AgentClient;
use crate::cgroup::{CgroupRequest, HostCgroup};
use crate::config::Config;
use crate::guest_image::GuestImage;
use crate::hypervisor::{self, tail_lines, Hypervisor, VmSpec};
use crate::process::{pid_alive, ProcessRecord};
use crate::{Error, Result};

/// Longest sandbox id (Kubernetes' and podman's are 64 hex digits). Socket
/// paths below the sandbox directory may exceed `sun_path`: every binder
/// and connector goes through [`tegmen_vmm::unix_path`], and QEMU runs in
/// the sandbox directory with relative socket paths.
pub const MAX_ID_LEN: usize = 64;
/// How long one agent RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest may take to power off after `Shutdown`.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the console shown in boot errors.
const CONSOLE_TAIL: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Running,
    Stopped,
}

/// Which of Tegmen's faces made a sandbox and drives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Face {
    /// The `supervisor` CLI (a throwaway sandbox of `check --boot`, tests).
    #[default]
    Supervisor,
    /// `tegmen`, the OCI runtime: one container per sandbox.
    Tegmen,
    /// `containerd-shim-tegmen-v2`: one pod per sandbox.
    Shim,
}

impl Face {
    pub fn as_str(self) -> &'static str {
        match self {
            Face::Supervisor => "supervisor",
            Face::Tegmen => "tegmen",
            Face::Shim => "shim",
        }
    }
}

/// A container of a sandbox, as `state.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEntry {
    pub id: String,
    /// The bundle it was created from, when a face gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Seconds since the epoch.
    pub created: u64,
    /// The container's own host cgroup, when it is not the VM's (the app
    /// containers of a pod: it holds no process, the pod's VM is in the
    /// sandbox container's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<HostCgroup>,
    /// Its part of the share, `<id>` or `<id>.<n>` (empty in older
    /// states: `<id>`).
    #[serde(default)]
    pub share: String,
}

impl ContainerEntry {
    /// The name of its directory below the share.
    pub fn share_part(&self) -> &str {
        if self.share.is_empty() {
            &self.id
        } else {
            &self.share
        }
    }
}

/// The configuration a sandbox's VM was booted with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootRecord {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Beyond the backend's own (console, reboot, panic).
    pub kernel_params: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub boot_timeout_secs: u64,
}

/// The guest's kernel parameters beyond the backend's own: the
/// configuration's, and the debug console's word when it is on.
fn guest_kernel_params(config: &Config) -> String {
    // The debug console is `debug_console`'s alone: the word is not taken
    // from `kernel_params` (the state would say it is off).
    let mut params = config
        .guest
        .kernel_params
        .split_whitespace()
        .filter(|w| *w != tegmen_agent_api::DEBUG_CONSOLE_PARAM)
        .collect::<Vec<_>>()
        .join(" ");
    if config.guest.debug_console {
        if !params.is_empty() {
            params.push(' ');
        }
        params.push_str(tegmen_agent_api::DEBUG_CONSOLE_PARAM);
    }
    params
}

/// What `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    pub status: Status,
    #[serde(default)]
    pub face: Face,
    pub hypervisor: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// The process that owns a throwaway sandbox: when it is gone, the
    /// sandbox is stale and the next start removes it.
    pub owner: Option<ProcessRecord>,
    pub processes: Vec<ProcessRecord>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Milliseconds from starting the VM to the agent's first answer.
    pub boot_to_agent_ms: Option<u64>,
    /// Booted with the debug console on (`supervisor exec` works).
    #[serde(default)]
    pub debug_console: bool,
    /// What the VM was booted with (`supervisor inspect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootRecord>,
    /// The containers in the guest, in the order they were added.
    #[serde(default)]
    pub containers: Vec<ContainerEntry>,
    /// How many parts of the share were ever made: a re-used id's next
    /// part is `<id>.<shares_made>`.
    #[serde(default)]
    pub shares_made: u64,
    /// Ids whose part of the share was removed, newest last (at most
    /// [`MAX_RETIRED_SHARES`]): such an id gets a part of a new name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_shares: Vec<String>,
    /// The host cgroup every host process of the VM is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<HostCgroup>,
    /// The network namespace wired to the VM's NICs, and its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkState>,
}

/// Retired ids remembered. Older ones are forgotten: by then the guest's
/// cached entries of them (a second by default) are long gone.
pub const MAX_RETIRED_SHARES: usize = 4096;

impl SandboxState {
    /// Remembers that `id`'s part of the share was removed.
    pub fn retire_share(&mut self, id: &str) {
        self.retired_shares.retain(|r| r != id);
        self.retired_shares.push(id.to_string());
        if self.retired_shares.len() > MAX_RETIRED_SHARES {
            let extra = self.retired_shares.len() - MAX_RETIRED_SHARES;
            self.retired_shares.drain(..extra);
        }
    }
}

/// The guest's side of `net`: each NIC with its endpoint's MTU and
/// addresses, then its routes and permanent neighbours.
fn guest_network(net: &NetworkState) -> tegmen_agent_api::agent::ConfigureNetworkRequest {
    use tegmen_agent_api::agent::{ConfigureNetworkRequest, NetworkInterface, NetworkNeighbor, NetworkRoute};
    let mut req = ConfigureNetworkRequest::new();
    for ep in &net.endpoints {
        let mut nic = NetworkInterface::new();
        nic.mac = ep.mac.clone();
        nic.mtu = ep.mtu;
        nic.addresses = ep.addresses.clone();
        req.interfaces.push(nic);
        for (dst, gw) in &ep.routes {
            let mut r = NetworkRoute::new();
            r.destination = dst.clone();
            r.gateway = gw.clone();
            r.device_mac = ep.mac.clone();
            req.routes.push(r);
        }
        for (ip, mac) in &ep.neighbours {
            let mut n = NetworkNeighbor::new();
            n.ip = ip.clone();
            n.mac = mac.clone();
            n.device_mac = ep.mac.clone();
            req.neighbors.push(n);
        }
    }
    req
}

/// What [`crate::netns::wire`] did, to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    pub netns: PathBuf,
    /// Each endpoint's name, link index in the namespace, and the guest
    /// NIC's MAC (the endpoint's).
    pub endpoints: Vec<NetworkEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEndpoint {
    pub name: String,
    pub index: u32,
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    /// `address/prefix`, as CNI gave them.
    pub addresses: Vec<String>,
    /// Routes through it: `(destination or "" for default, gateway or "")`.
    #[serde(default)]
    pub routes: Vec<(String, String)>,
    /// Its permanent neighbours: `(IPv4 address, MAC)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbours: Vec<(String, String)>,
    /// Set once its redirects are in place (and so its qdisc is ours).
    #[serde(default)]
    pub wired: bool,
}

/// Options of one sandbox beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// Tie the sandbox to this process: removed as stale once it is gone.
    pub owned_by_current_process: bool,
    /// Who drives the sandbox (recorded for `supervisor list`).
    pub face: Face,
    /// The host cgroup to run the VM's processes in (a container's
    /// `linux.cgroupsPath`, with limits for the VM as a whole).
    pub cgroup: Option<CgroupRequest>,
    /// The VM's network interfaces.
    pub nics: Vec<crate::hypervisor::Nic>,
    /// A network namespace (CNI's, podman's) whose interfaces the guest
    /// takes over: one NIC each, wired by tc redirects ([`crate::netns`]).
    pub netns: Option<PathBuf>,
}

pub struct Sandbox {
    id: String,
    dir: PathBuf,
    state: SandboxState,
    hypervisor: Box<dyn Hypervisor>,
    agent: Option<AgentClient>,
    boot_time: Duration,
    spawn_time: Duration,
    torn_down: bool,
    nics: Vec<crate::hypervisor::Nic>,
}

/// The paths of one sandbox.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(config: &Config, id: &str) -> Layout {
        Layout {
            dir: config.sandboxes_dir().join(id),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock")
    }
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// runc's rule for container ids, plus a length bound.
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::InvalidId {
            id: id.to_string(),
            why,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("longer than 64 characters");
    }
    if id == "." || id == ".." {
        return bad("a relative path component");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c)) {
        return bad("only letters, digits and _ + - . are allowed");
    }
    Ok(())
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_state(path: &Path, state: &SandboxState) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(state).expect("sandbox state serializes");
    std::fs::write(&tmp, text).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming", path, e))
}

pub fn read_state(dir: &Path) -> Result<SandboxState> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::io("parsing", &path, std::io::Error::other(e)))
}

impl Sandbox {
    /// Lays out the sandbox, boots its VM and waits for the agent. On any
    /// error everything made so far is removed again. Containers are added
    /// afterwards ([`Sandbox::add_container`]).
    pub fn create(config: &Config, id: &str, options: &SandboxOptions) -> Result<Sandbox> {
        validate_id(id)?;
        let layout = Layout::new(config, id);
        let image = GuestImage::resolve(config)?;
        let choice = hypervisor::choose_backend(config)?;
        let hypervisor = hypervisor::new_hypervisor(config, &choice)?;
        cleanup_stale(config)?;

        let owner = if options.owned_by_current_process {
            ProcessRecord::of("owner", std::process::id() as i32)
        } else {
            None
        };
        let state = SandboxState {
            id: id.to_string(),
            status: Status::Creating,
            face: options.face,
            hypervisor: hypervisor.name().to_string(),
            created: now_secs(),
            owner,
            processes: Vec::new(),
            memory_mib: config.guest.memory_mib,
            vcpus: config.guest.vcpus,
            boot_to_agent_ms: None,
            debug_console: config.guest.debug_console,
            boot: None,
            containers: Vec::new(),
            shares_made: 0,
            retired_shares: Vec::new(),
            host_cgroup: None,
            network: None,
        };
        // The namespace's interfaces, before anything is made: a bad path
        // fails here with nothing to undo.
        let mut nics = options.nics.clone();
        let mut network = None;
        if let Some(ns) = &options.netns {
            crate::netns::refuse_host(ns)?;
            let endpoints = crate::netns::endpoints(ns)?;
            let routes = crate::netns::routes(ns)?;
            let neighbours = crate::netns::neighbours(ns)?;
            let mut recorded = Vec::new();
            for (i, ep) in endpoints.iter().enumerate() {
                let nic = crate::hypervisor::Nic {
                    tap: format!("tap{i}_tg"),
                    netns: Some(ns.clone()),
                    mac: ep.mac,
                    mtu: ep.mtu.min(u32::from(u16::MAX)) as u16,
                };
                recorded.push(NetworkEndpoint {
                    name: ep.name.clone(),
                    index: ep.index,
                    tap: nic.tap.clone(),
                    mac: nic.mac_string(),
                    mtu: ep.mtu,
                    addresses: ep.addresses.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
                    routes: routes
                        .iter()
                        .filter(|r| r.index == ep.index)
                        .map(|r| {
                            (
                                r.destination.clone().unwrap_or_default(),
                                r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                            )
                        })
                        .collect(),
                    neighbours: neighbours
                        .iter()
                        .filter(|n| n.index == ep.index)
                        .map(|n| (n.ip.to_string(), crate::hypervisor::mac_string(&n.mac)))
                        .collect(),
                    wired: false,
                });
                nics.push(nic);
            }
            network = Some(NetworkState {
                netns: ns.clone(),
                endpoints: recorded,
            });
        }
        make_dir_atomically(config, id, &state)?;

        let mut sandbox = Sandbox {
            id: id.to_string(),
            dir: layout.dir.clone(),
            state,
            hypervisor,
            agent: None,
            boot_time: Duration::ZERO,
            spawn_time: Duration::ZERO,
            torn_down: false,
            nics,
        };
        let booted = sandbox
            .make_cgroup(options.cgroup.as_ref())
            .and_then(|()| sandbox.boot(config, &layout, &image, choice.accel, network));
        match booted {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                sandbox.teardown();
                Err(e)
            }
        }
    }

    /// Makes the VM's host cgroup before any of its processes exists, and
    /// records it at once (a teardown after kill -9 finds it there).
    fn make_cgroup(&mut self, request: Option<&CgroupRequest>) -> Result<()> {
        let Some(request) = request else {
            return Ok(());
        };
        self.state.host_cgroup = Some(request.create()?);
        write_state(&self.layout().state(), &self.state)
    }

    /// The host cgroup the VM's processes are in, if it has one.
    pub fn host_cgroup(&self) -> Option<&HostCgroup> {
        self.state.host_cgroup.as_ref()
    }

    fn boot(
        &mut self,
        config: &Config,
        layout: &Layout,
        image: &GuestImage,
        accel: hypervisor::Accel,
        network: Option<NetworkState>,
    ) -> Result<()> {
        let shared = layout.shared();
        std::fs::create_dir(&shared).map_err(|e| Error::io("creating", &shared, e))?;
        let id_file = shared.join(SANDBOX_ID_FILE);
        std::fs::write(&id_file, &self.id).map_err(|e| Error::io("writing", &id_file, e))?;
        // Mounts made below the share later (containers added to the
        // running sandbox) propagate into the backends' copies of it.
        crate::container::make_shared_mount(&shared)?;

        let spec = VmSpec {
            id: self.id.clone(),
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            memory_mib: config.guest.memory_mib,
            vcpus: config.guest.vcpus,
            kernel_params: guest_kernel_params(config),
            run_dir: layout.dir.clone(),
            vsock_socket: layout.vsock_socket(),
            shared_dir: shared,
            console_log: layout.console_log(),
            accel,
            cgroup: self.state.host_cgroup.clone(),
            nics: self.nics.clone(),
            seccomp: config.seccomp,
        };
        self.state.boot = Some(BootRecord {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            kernel_params: spec.kernel_params.clone(),
            accel: match accel {
                hypervisor::Accel::Kvm => "kvm",
                hypervisor::Accel::Tcg => "tcg",
            }
            .into(),
            boot_timeout_secs: config.guest.boot_timeout_secs,
        });
        let started = Instant::now();
        let state_path = layout.state();
        let state = &mut self.state;
        self.hypervisor.start(&spec, &mut |rec| {
            state.processes.push(rec);
            // Best effort: a later teardown also finds processes by name.
            let _ = write_state(&state_path, state);
        })?;
        self.spawn_time = started.elapsed();
        // The backends made the taps: wire them to the namespace's
        // interfaces, recorded first so that a failure halfway is undone.
        if let Some(net) = network {
            self.state.network = Some(net.clone());
            for (i, ep) in net.endpoints.iter().enumerate() {
                let endpoint = crate::netns::Endpoint {
                    name: ep.name.clone(),
                    index: ep.index,
                    mac: [0; 6],
                    mtu: ep.mtu,
                    addresses: Vec::new(),
                };
                crate::netns::wire(&net.netns, &endpoint, &ep.tap)?;
                if let Some(n) = self.state.network.as_mut() {
                    n.endpoints[i].wired = true;
                }
                write_state(&state_path, &self.state)?;
            }
        }

        let timeout = Duration::from_secs(config.guest.boot_timeout_secs);
        let agent = self.wait_for_agent(layout, started, timeout)?;
        if let Some(net) = &self.state.network {
            agent.configure_network(&guest_network(net))?;
        }
        self.boot_time = started.elapsed();
        self.agent = Some(agent);
        self.state.status = Status::Running;
        self.state.boot_to_agent_ms = Some(self.boot_time.as_millis() as u64);
        write_state(&state_path, &self.state)
    }

    fn wait_for_agent(&mut self, layout: &Layout, started: Instant, timeout: Duration) -> Result<AgentClient> {
        let socket = layout.vsock_socket();
        let deadline = started + timeout;
        loop {
            if let Some(status) = self.hypervisor.exited() {
                return Err(Error::VmExitedDuringBoot {
                    id: self.id.clone(),
                    status,
                    console: self.console_tail(),
                });
            }
            if socket.exists() {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(5));
                if let Ok(agent) = AgentClient::connect(
                    &socket,
                    AGENT_VSOCK_PORT,
                    left.max(Duration::from_millis(100)),
                    RPC_TIMEOUT,
                ) {
                    if agent.check().is_ok() {
                        return Ok(agent);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::AgentTimeout {
                    id: self.id.clone(),
                    secs: timeout.as_secs(),
                    console: self.console_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn console_tail(&self) -> String {
        let mut text = tail_lines(&self.layout().console_log(), CONSOLE_TAIL);
        let qemu_log = self.dir.join("qemu.log");
        if qemu_log.exists() {
            let q = tail_lines(&qemu_log, 5);
            if !q.ends_with("is empty)") {
                text.push_str("\nqemu: ");
                text.push_str(&q);
            }
        }
        text
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// Changes the recorded state and writes `state.json`.
    pub(crate) fn update_state(&mut self, change: impl FnOnce(&mut SandboxState)) -> Result<()> {
        change(&mut self.state);
        write_state(&self.layout().state(), &self.state)
    }

    /// The host side of the virtio-fs share (`/run/tegmen/shared` in the
    /// guest): container root file systems go below it.
    pub fn shared_dir(&self) -> PathBuf {
        self.layout().shared()
    }

    fn layout(&self) -> Layout {
        Layout { dir: self.dir.clone() }
    }

    /// Where the host opens the agent's stdio streams.
    pub fn stream_endpoint(&self) -> crate::agent_client::StreamEndpoint {
        crate::agent_client::StreamEndpoint::HybridVsock(self.layout().vsock_socket())
    }

    /// Time from starting the VM to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The host's part of [`Sandbox::boot_time`]: starting the device
    /// backends and the hypervisor process; the rest is the guest booting
    /// to its agent.
    pub fn spawn_time(&self) -> Duration {
        self.spawn_time
    }

    pub fn agent(&self) -> &AgentClient {
        self.agent.as_ref().expect("a created sandbox has an agent")
    }

    /// Asks the agent to power the guest off, waits for the VM to end, then
    /// removes everything. Forced if the guest does not comply in time.
    pub fn shutdown(mut self) -> Result<()> {
        let asked = self.agent.as_ref().map(|a| a.shutdown());
        self.agent = None;
        let ended = self.hypervisor.wait(SHUTDOWN_TIMEOUT);
        self.teardown();
        match asked {
            Some(Err(e)) => Err(e),
            _ if !ended => Err(Error::Hypervisor(format!(
                "sandbox {}: the VM did not power off within {}s of Shutdown; it was killed",
                self.id,
                SHUTDOWN_TIMEOUT.as_secs()
            ))),
            _ => Ok(()),
        }
    }

    /// Kills the VM and removes everything, without asking the guest.
    pub fn destroy(mut self) {
        self.teardown();
    }

    /// Leaves the VM running after this value (and this process) is gone:
    /// the sandbox loses its owner, so it is never removed as stale, and
    /// lives on until [`destroy`] removes it by id, from any process. Its
    /// host processes are in sessions of their own and get re-parented.
    pub fn detach(mut self) -> Result<()> {
        self.state.owner = None;
        let written = write_state(&self.layout().state(), &self.state);
        self.torn_down = true;
        self.agent = None;
        // The backend's Drop would kill the VM: forget it instead.
        let hypervisor = std::mem::replace(&mut self.hypervisor, Box::new(Detached));
        std::mem::forget(hypervisor);
        written
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.agent = None;
        self.hypervisor.kill();
        let _ = remove_sandbox_dir(&self.dir, &self.state);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// What a detached [`Sandbox`] holds instead of its backend: the VM is no
/// longer this process's to drive.
struct Detached;

impl Hypervisor for Detached {
    fn name(&self) -> &'static str {
        "detached"
    }
    fn start(&mut self, _spec: &VmSpec, _record: &mut dyn FnMut(ProcessRecord)) -> Result<()> {
        Err(Error::Hypervisor("a detached sandbox cannot start a VM".into()))
    }
    fn exited(&mut self) -> Option<String> {
        None
    }
    fn wait(&mut self, _timeout: Duration) -> bool {
        false
    }
    fn kill(&mut self) {}
}

/// Kills the VM of sandbox `id` and removes everything it left, from any
/// process (the one that created it may be long gone): its recorded
/// processes, mounts below its directory, the directory.
pub fn destroy(config: &Config, id: &str) -> Result<()> {
    validate_id(id)?;
    let dir = Layout::new(config, id).dir;
    if !dir.exists() {
        return Err(Error::SandboxNotFound(id.to_string()));
    }
    stop_owner(config, id);
    let survivors = match read_state(&dir) {
        Ok(state) => remove_sandbox_dir(&dir, &state),
        Err(_) => remove_sandbox_dir_of(&dir, &[], &[]),
    };
    if !survivors.is_empty() {
        let list: Vec<String> = survivors.iter().map(|p| format!("{} ({})", p.pid, p.name)).collect();
        return Err(Error::Hypervisor(format!(
            "sandbox {id}: processes {} did not exit on SIGKILL",
            list.join(", ")
        )));
    }
    if dir.exists() {
        return Err(Error::Hypervisor(format!(
            "sandbox {id}: {} could not be removed",
            dir.display()
        )));
    }
    Ok(())
}

/// Kills the process still making sandbox `id` (its live owner, a
/// `create` that has not finished), unless that is this process, and waits
/// for it: it would go on starting processes and mounting below the
/// directory while the sandbox is being removed.
pub fn stop_owner(config: &Config, id: &str) {
    let Ok(state) = read_state(&Layout::new(config, id).dir) else {
        return;
    };
    if let Some(owner) = state.owner.filter(|o| o.pid != std::process::id() as i32) {
        owner.kill();
        owner.wait_gone(Duration::from_secs(5));
    }
}

/// True while the VM of the sandbox in `dir` runs (its QEMU process, as
/// recorded in `state.json`, is alive).
pub fn vm_alive(dir: &Path) -> bool {
    read_state(dir).is_ok_and(|s| vm_process_alive(&s))
}

/// True while the sandbox runs and its VM's process (QEMU, or the builtin
/// monitor) lives.
pub fn vm_process_alive(state: &SandboxState) -> bool {
    state.status == Status::Running
        && state
            .processes
            .iter()
            .any(|p| (p.name == "qemu" || p.name == "tegmen-vmm") && p.is_alive())
}

/// Creates `<sandboxes>/<id>` with its `state.json` in one rename, so a
/// sandbox directory without a state file never exists.
fn make_dir_atomically(config: &Config, id: &str, state: &SandboxState) -> Result<()> {
    let parent = config.sandboxes_dir();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io("creating", &parent, e))?;
    let tmp = parent.join(format!(".{id}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    write_state(&tmp.join("state.json"), state)?;
    let dest = parent.join(id);
    // rename(2) onto an existing non-empty directory fails: the id is taken.
    if dest.exists() || std::fs::rename(&tmp, &dest).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::SandboxExists(id.to_string()));
    }
    Ok(())
}

/// Kills what is left of a sandbox's processes, unmounts anything below
/// its directory and removes it and its host cgroups; the processes that
/// would not die.
fn remove_sandbox_dir(dir: &Path, state: &SandboxState) -> Vec<ProcessRecord> {
    let cgroups: Vec<PathBuf> = state
        .host_cgroup
        .iter()
        .chain(state.containers.iter().filter_map(|c| c.host_cgroup.as_ref()))
        .flat_map(|c| c.created.iter().cloned())
        .collect();
    let survivors = remove_sandbox_dir_of(dir, &state.processes, &cgroups);
    // After the backends are gone (their taps with them): the namespace's
    // interfaces as CNI left them.
    if let Some(net) = &state.network {
        for ep in net.endpoints.iter().filter(|e| e.wired) {
            if let Err(e) = crate::netns::unwire(&net.netns, ep.index) {
                eprintln!("sandbox cleanup: {e}");
            }
        }
    }
    survivors
}

/// How often the processes of a sandbox are looked for and killed before
/// those still alive are reported.
const KILL_ROUNDS: usize = 3;

fn remove_sandbox_dir_of(dir: &Path, recorded: &[ProcessRecord], cgroups: &[PathBuf]) -> Vec<ProcessRecord> {
    // Recorded ones and any other of ours naming the directory (started
    // but not recorded yet); looked for again until none is found, since
    // one may have been starting while the last round looked.
    let mut survivors = Vec::new();
    for round in 0..KILL_ROUNDS {
        let mut victims: Vec<ProcessRecord> = if round == 0 { recorded.to_vec() } else { Vec::new() };
        victims.extend(find_processes_using(dir));
        if victims.is_empty() {
            survivors.clear();
            break;
        }
        for p in &victims {
            p.kill();
        }
        survivors = victims
            .into_iter()
            .filter(|p| !p.wait_gone(Duration::from_secs(2)))
            .collect();
    }
    if let Err(e) = crate::cgroup::remove_dirs(cgroups) {
        eprintln!("sandbox cleanup: {e}");
    }
    unmount_below(dir);
    // Never recurse into a file system that is still mounted below the
    // directory (a bind-mounted container rootfs): its files are not ours.
    if mounts_below(dir).is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    }
    survivors
}

/// Our own helper processes (QEMU and the backends) whose command line
/// names a path inside `dir`: found even if the state file missed them.
fn find_processes_using(dir: &Path) -> Vec<ProcessRecord> {
    let needle = format!("{}/", dir.display());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let Some(program) = args.next() else { continue };
        let base = Path::new(&program)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = base.starts_with("qemu-system-") || base.starts_with("tegmen-");
        if ours && args.any(|a| a.contains(&needle)) {
            if let Some(rec) = ProcessRecord::of(&base, pid) {
                found.push(rec);
            }
        }
    }
    found
}

/// Mount points at or below `dir`, as this process's mount namespace has them.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let mut targets = mounts_below(dir);
    targets.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for t in targets {
        let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub(crate) fn unescape_mount_path(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// All sandboxes under the configured root, as their state files say.
pub fn list(config: &Config) -> Vec<SandboxState> {
    let Ok(entries) = std::fs::read_dir(config.sandboxes_dir()) else {
        return Vec::new();
    };
    let mut states: Vec<SandboxState> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| read_state(&e.path()).ok())
        .collect();
    states.sort_by(|a, b| a.id.cmp(&b.id));
    states
}

/// True when nothing keeps this sandbox alive: its owner is gone.
fn is_stale(state: &SandboxState) -> bool {
    state.owner.as_ref().is_some_and(|o| !o.is_alive())
}

/// Removes sandboxes whose owning process died (the supervisor was killed),
/// and half-made directories of dead processes. Returns the ids removed.
pub fn cleanup_stale(config: &Config) -> Result<Vec<String>> {
    let parent = config.sandboxes_dir();
    let entries = match std::fs::read_dir(&parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading", &parent, e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(rest) = name.strip_prefix('.') {
            // `.<id>.<pid>.tmp` from make_dir_atomically.
            let pid = rest
                .strip_suffix(".tmp")
                .and_then(|r| r.rsplit('.').next())
                .and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| !pid_alive(p)) {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        match read_state(&path) {
            Ok(state) if is_stale(&state) => {
                let _ = remove_sandbox_dir(&path, &state);
                removed.push(name);
            }
            _ => {}
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runc_rules() {
        for ok in ["a", "sandbox-1", "A_b+c.d", &"x".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path("/x\\"), PathBuf::from("/x\\"));
    }

    fn test_config(dir: &Path) -> Config {
        Config {
            root: dir.to_path_buf(),
            ..Config::default()
        }
    }

    fn state(id: &str, owner: Option<ProcessRecord>) -> SandboxState {
        SandboxState {
            id: id.into(),
            status: Status::Running,
            hypervisor: "qemu".into(),
            created: 0,
            owner,
            processes: Vec::new(),
            memory_mib: 256,
            vcpus: 1,
            boot_to_agent_ms: None,
            debug_console: false,
            boot: None,
            face: Face::Tegmen,
            containers: Vec::new(),
            shares_made: 0,
            retired_shares: Vec::new(),
            host_cgroup: None,
            network: None,
        }
    }

    #[test]
    fn stale_sandboxes_of_dead_owners_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let config = test_config(root.path());
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_owner = ProcessRecord::of("owner", dead.id() as i32).unwrap();
        dead.wait().unwrap();
        // A process recorded by the dead sandbox, still running: it must go.
        let mut leftover = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut st = state("gone", Some(dead_owner));
        st.processes
            .push(ProcessRecord::of("qemu", leftover.id() as i32).unwrap());
        make_dir_atomically(&config, "gone", &st).unwrap();
        let me = ProcessRecord::of("owner", std::process::id() as i32);
        make_dir_atomically(&config, "live", &state("live", me)).unwrap();
        make_dir_atomically(&config, "unowned", &state("unowned", None)).unwrap();
        std::fs::create_dir_all(config.sandboxes_dir().join(".half.999999999.tmp")).unwrap();

        let removed = cleanup_stale(&config).unwrap();
        assert_eq!(removed, vec!["gone".to_string()]);
        assert!(
            leftover.try_wait().unwrap().is_some(),
            "the stale sandbox's process was killed"
        );
        let left: Vec<String> = list(&config).into_iter().map(|s| s.id).collect();
        assert_eq!(left, vec!["live".to_string(), "unowned".to_string()]);
        assert!(!config.sandboxes_dir().join(".half.999999999.tmp").exists());
    }

    #[test]
    fn an_id_in_use_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let config = test_config(root.path());
        make_dir_atomically(&config, "one", &state("one", None)).unwrap();
        let e = make_dir_atomically(&config, "one", &state("one", None)).unwrap_err();
        assert!(matches!(e, Error::SandboxExists(_)), "{e}");
        assert_eq!(
            std::fs::read_dir(config.sandboxes_dir()).unwrap().count(),
            1,
            "no temp dir left"
        );
    }
}
