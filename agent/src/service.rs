//! The agent API service: answers the supervisor's ttrpc requests.

use std::path::Path;
use std::time::Duration;

use tegmen_agent_api::agent::*;
use tegmen_agent_api::agent_ttrpc::Agent;
use tegmen_agent_api::{API_VERSION, GUEST_SHARED_DIR};
use ttrpc::TtrpcContext;

use crate::guest;

pub struct AgentService {
    /// True when the agent is the guest's PID 1 (Shutdown powers off).
    as_init: bool,
}

impl AgentService {
    pub fn new(as_init: bool) -> Self {
        Self { as_init }
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
        resp.shared_mount = GUEST_SHARED_DIR.to_string();
        resp.sandbox_id = guest::sandbox_id(Path::new(GUEST_SHARED_DIR))
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
}
