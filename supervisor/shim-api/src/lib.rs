//! The containerd shim v2 wire API, for Tegmen's containerd shim.
//!
//! containerd (1.6 and later) drives a runtime through a *shim*: a process it
//! starts per sandbox that serves the `containerd.task.v2.Task` ttrpc service
//! on a unix socket, and that publishes task events back to containerd by
//! calling `containerd.services.events.ttrpc.v1.Events/Forward` on
//! containerd's own ttrpc socket. This crate carries that API: the messages,
//! an async (tokio) ttrpc server trait and client for both services, the task
//! event messages and topics, the cgroup v2 metrics Stats returns, and the
//! options message containerd's CRI plugin sends.
//!
//! The `.proto` files under `protos/` are written for Tegmen, wire-compatible
//! with containerd 1.6: package, service, message and field names and numbers
//! are containerd's (they fix the wire format and the type URLs), the text is
//! ours, and there are no gogoproto options. The code is generated at build
//! time by the pure-Rust `ttrpc-codegen` (no protoc); `google.protobuf.Any`,
//! `Empty` and `Timestamp` are protobuf's own [`protobuf::well_known_types`].
//!
//! # Why not `containerd-shim-protos`
//!
//! That crate carries the same API, but its 0.11 line depends on ttrpc 0.9
//! while the workspace uses ttrpc 0.10 (the agent API, `tegmen-agent-api`):
//! using it would put two ttrpc crates, with types that do not mix, in the
//! lock. This crate is small and shares the workspace's single ttrpc and
//! protobuf.
//!
//! # Modules
//!
//! | module | protobuf package | what |
//! | --- | --- | --- |
//! | [`shim`] | `containerd.task.v2` | Task requests and responses |
//! | [`shim_ttrpc`] | | async server trait [`shim_ttrpc::Task`], [`shim_ttrpc::create_task`], [`shim_ttrpc::TaskClient`] |
//! | [`mount`] | `containerd.types` | [`mount::Mount`] |
//! | [`task`] | `containerd.v1.types` | [`task::Status`], [`task::ProcessInfo`] |
//! | [`task_events`] | `containerd.events` | TaskCreate, TaskExit, ... (see [`TaskEvent`]) |
//! | [`events`] | `containerd.services.events.ttrpc.v1` | [`events::Envelope`], [`events::ForwardRequest`] |
//! | [`events_ttrpc`] | | [`events_ttrpc::EventsClient`], server trait [`events_ttrpc::Events`] |
//! | [`cgroups_v2`] | `io.containerd.cgroups.v2` | [`cgroups_v2::Metrics`] for Stats |
//! | [`runtimeoptions`] | `runtimeoptions.v1` | [`runtimeoptions::Options`] in CreateTaskRequest.options |
//!
//! # Type URLs
//!
//! containerd 1.6 packs and unpacks `Any` with `github.com/containerd/typeurl`
//! v1, which names a protobuf message by its bare full name
//! (`containerd.events.TaskExit`, no `type.googleapis.com/` prefix) and looks
//! a received type_url up by that exact string. [`to_any`] therefore writes
//! the bare full name (protobuf's own `Any::pack` would add the prefix, which
//! containerd 1.6 would not resolve). Newer typeurl (v2, containerd 1.7+) also
//! writes the bare name and accepts both forms, as [`from_any`] does.

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::MessageFull;

/// Messages of `protos/mount.proto` (`containerd.types`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod mount {
    include!(concat!(env!("OUT_DIR"), "/mount.rs"));
}

/// Messages of `protos/task.proto` (`containerd.v1.types`): the process
/// [`Status`](task::Status) enum and [`ProcessInfo`](task::ProcessInfo).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod task {
    include!(concat!(env!("OUT_DIR"), "/task.rs"));
}

/// Messages of `protos/shim.proto` (`containerd.task.v2`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod shim {
    include!(concat!(env!("OUT_DIR"), "/shim.rs"));
}

/// Async ttrpc server trait [`Task`](shim_ttrpc::Task), its service map
/// [`create_task`](shim_ttrpc::create_task) and the client
/// [`TaskClient`](shim_ttrpc::TaskClient) of `containerd.task.v2.Task`.
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod shim_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/shim_ttrpc.rs"));
}

/// Task event messages of `protos/task_events.proto` (`containerd.events`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod task_events {
    include!(concat!(env!("OUT_DIR"), "/task_events.rs"));
}

/// Messages of `protos/events.proto` (`containerd.services.events.ttrpc.v1`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod events {
    include!(concat!(env!("OUT_DIR"), "/events.rs"));
}

/// Async ttrpc client [`EventsClient`](events_ttrpc::EventsClient) (and
/// server trait) of `containerd.services.events.ttrpc.v1.Events`.
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod events_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/events_ttrpc.rs"));
}

/// cgroup v2 metrics of `protos/cgroups_v2.proto` (`io.containerd.cgroups.v2`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod cgroups_v2 {
    include!(concat!(env!("OUT_DIR"), "/cgroups_v2.rs"));
}

/// The CRI plugin's runtime options of `protos/runtimeoptions.proto`
/// (`runtimeoptions.v1`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/runtimeoptions.rs"));
}

/// ttrpc service name of the task API (method paths are `/<this>/<Method>`).
pub const TASK_SERVICE: &str = "containerd.task.v2.Task";

/// ttrpc service name of containerd's events service.
pub const EVENTS_SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";

/// ttrpc metadata key that carries the containerd namespace, both on
/// containerd's calls to the shim and on the shim's Forward calls.
pub const NAMESPACE_HEADER: &str = "containerd-namespace-ttrpc";

/// Event topics, as containerd's `runtime` package defines them.
pub mod topic {
    /// [`TaskCreate`](crate::task_events::TaskCreate).
    pub const TASK_CREATE: &str = "/tasks/create";
    /// [`TaskStart`](crate::task_events::TaskStart).
    pub const TASK_START: &str = "/tasks/start";
    /// [`TaskDelete`](crate::task_events::TaskDelete).
    pub const TASK_DELETE: &str = "/tasks/delete";
    /// [`TaskExit`](crate::task_events::TaskExit).
    pub const TASK_EXIT: &str = "/tasks/exit";
    /// [`TaskOOM`](crate::task_events::TaskOOM).
    pub const TASK_OOM: &str = "/tasks/oom";
    /// [`TaskExecAdded`](crate::task_events::TaskExecAdded).
    pub const TASK_EXEC_ADDED: &str = "/tasks/exec-added";
    /// [`TaskExecStarted`](crate::task_events::TaskExecStarted).
    pub const TASK_EXEC_STARTED: &str = "/tasks/exec-started";
    /// [`TaskPaused`](crate::task_events::TaskPaused).
    pub const TASK_PAUSED: &str = "/tasks/paused";
    /// [`TaskResumed`](crate::task_events::TaskResumed).
    pub const TASK_RESUMED: &str = "/tasks/resumed";
    /// [`TaskCheckpointed`](crate::task_events::TaskCheckpointed).
    pub const TASK_CHECKPOINTED: &str = "/tasks/checkpointed";
}

/// A task event message and the topic it is published on.
pub trait TaskEvent: MessageFull {
    /// The topic of [`topic`] this event goes out on.
    const TOPIC: &'static str;
}

macro_rules! task_events {
    ($($msg:ident => $topic:ident,)*) => {
        $(impl TaskEvent for task_events::$msg {
            const TOPIC: &'static str = topic::$topic;
        })*
    };
}

task_events! {
    TaskCreate => TASK_CREATE,
    TaskStart => TASK_START,
    TaskDelete => TASK_DELETE,
    TaskExit => TASK_EXIT,
    TaskOOM => TASK_OOM,
    TaskExecAdded => TASK_EXEC_ADDED,
    TaskExecStarted => TASK_EXEC_STARTED,
    TaskPaused => TASK_PAUSED,
    TaskResumed => TASK_RESUMED,
    TaskCheckpointed => TASK_CHECKPOINTED,
}

/// The type_url containerd uses for `M`: its bare protobuf full name, e.g.
/// `containerd.events.TaskExit` (see the crate docs on type URLs).
pub fn type_url<M: MessageFull>() -> String {
    M::descriptor().full_name().to_string()
}

/// The message name a type_url refers to: the part after the last `/`, so
/// both `containerd.events.TaskExit` and
/// `type.googleapis.com/containerd.events.TaskExit` give
/// `containerd.events.TaskExit`.
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Packs `m` in an `Any` the way containerd's typeurl does: type_url is the
/// bare full name ([`type_url`]), value the encoded message.
///
/// # Panics
///
/// If `m` cannot be encoded, which for these proto3 messages only happens
/// past protobuf's 2 GiB message limit.
pub fn to_any<M: MessageFull>(m: &M) -> Any {
    Any {
        type_url: type_url::<M>(),
        value: m.write_to_bytes().expect("encoding a proto3 message"),
        ..Default::default()
    }
}

/// Whether `any` holds an `M`, by either type_url form ([`type_name`]).
pub fn is<M: MessageFull>(any: &Any) -> bool {
    type_name(&any.type_url) == M::descriptor().full_name()
}

/// Unpacks an `M` from `any`: `Ok(None)` if it holds another type, an error
/// if it claims to be an `M` but does not decode. Accepts the bare and the
/// prefixed type_url forms.
pub fn from_any<M: MessageFull>(any: &Any) -> protobuf::Result<Option<M>> {
    if !is::<M>(any) {
        return Ok(None);
    }
    M::parse_from_bytes(&any.value).map(Some)
}

/// The Envelope containerd expects for `event` in `namespace`, stamped
/// `timestamp` (e.g. [`Timestamp::now`]).
pub fn envelope<E: TaskEvent>(namespace: &str, event: &E, timestamp: Timestamp) -> events::Envelope {
    events::Envelope {
        timestamp: Some(timestamp).into(),
        namespace: namespace.to_string(),
        topic: E::TOPIC.to_string(),
        event: Some(to_any(event)).into(),
        ..Default::default()
    }
}

/// The Forward request that publishes `event` in `namespace`, stamped now.
pub fn forward_request<E: TaskEvent>(namespace: &str, event: &E) -> events::ForwardRequest {
    events::ForwardRequest {
        envelope: Some(envelope(namespace, event, Timestamp::now())).into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
