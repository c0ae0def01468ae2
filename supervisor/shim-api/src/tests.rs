use std::sync::{Arc, Mutex};

use protobuf::reflect::{FieldDescriptor, ReflectValueBox, RuntimeFieldType, RuntimeType};
use protobuf::well_known_types::empty::Empty;
use protobuf::{Message, MessageDyn};

use super::*;
use crate::cgroups_v2::*;
use crate::events::{Envelope, ForwardRequest};
use crate::mount::Mount;
use crate::runtimeoptions::Options;
use crate::shim::*;
use crate::task::{ProcessInfo, Status};
use crate::task_events::*;

/// A value of type `t`, different for each `n`; messages are filled
/// recursively (to a bounded depth).
fn value(t: &RuntimeType, n: &mut u32, depth: u32) -> ReflectValueBox {
    *n += 1;
    match t {
        RuntimeType::I32 => ReflectValueBox::I32(*n as i32),
        RuntimeType::I64 => ReflectValueBox::I64(i64::from(*n) << 33),
        RuntimeType::U32 => ReflectValueBox::U32(*n),
        RuntimeType::U64 => ReflectValueBox::U64(u64::from(*n) << 33),
        RuntimeType::F32 => ReflectValueBox::F32(*n as f32),
        RuntimeType::F64 => ReflectValueBox::F64(f64::from(*n)),
        RuntimeType::Bool => ReflectValueBox::Bool(true),
        RuntimeType::String => ReflectValueBox::String(format!("s{n}")),
        RuntimeType::VecU8 => ReflectValueBox::Bytes(vec![*n as u8; 3]),
        RuntimeType::Enum(e) => ReflectValueBox::Enum(e.clone(), e.values().last().map_or(0, |v| v.value())),
        RuntimeType::Message(d) => {
            let mut m = d.new_instance();
            if depth < 3 {
                fill(&mut *m, n, depth + 1);
            }
            ReflectValueBox::Message(m)
        }
    }
}

/// Sets every field of `m` to a non-default value: singular fields, one
/// element of each repeated field, one entry of each map.
fn fill(m: &mut dyn MessageDyn, n: &mut u32, depth: u32) {
    let fields: Vec<FieldDescriptor> = m.descriptor_dyn().fields().collect();
    for f in fields {
        match f.runtime_field_type() {
            RuntimeFieldType::Singular(t) => {
                let v = value(&t, n, depth);
                f.set_singular_field(m, v);
            }
            RuntimeFieldType::Repeated(t) => {
                let v = value(&t, n, depth);
                f.mut_repeated(m).push(v);
            }
            RuntimeFieldType::Map(k, v) => {
                let (k, v) = (value(&k, n, depth), value(&v, n, depth));
                f.mut_map(m).insert(k, v);
            }
        }
    }
}

/// Fills an `M`, encodes it, decodes it and checks nothing was lost.
fn round_trip<M: MessageFull + PartialEq>() {
    let mut m = M::new();
    let mut n = 0;
    fill(&mut m, &mut n, 0);
    let d = M::descriptor();
    for f in d.fields() {
        if f.is_singular() {
            assert!(f.has_field(&m), "{}.{} not set", d.full_name(), f.name());
        }
    }
    let bytes = m.write_to_bytes().unwrap();
    assert!(!bytes.is_empty() || d.fields().next().is_none(), "{}", d.full_name());
    let back = M::parse_from_bytes(&bytes).unwrap();
    assert!(back == m, "{} changed in a round trip", d.full_name());
    // Nothing landed in unknown fields: every number decoded into a field.
    assert!(
        back.special_fields().unknown_fields().iter().next().is_none(),
        "{}",
        d.full_name()
    );
}

macro_rules! round_trip_all {
    ($($t:ty),* $(,)?) => {{ let mut names = Vec::new(); $(round_trip::<$t>(); names.push(type_url::<$t>());)* names }};
}

#[test]
fn every_message_round_trips() {
    let names = round_trip_all!(
        // containerd.task.v2
        CreateTaskRequest,
        CreateTaskResponse,
        DeleteRequest,
        DeleteResponse,
        ExecProcessRequest,
        ExecProcessResponse,
        ResizePtyRequest,
        StateRequest,
        StateResponse,
        KillRequest,
        CloseIORequest,
        PidsRequest,
        PidsResponse,
        CheckpointTaskRequest,
        UpdateTaskRequest,
        StartRequest,
        StartResponse,
        WaitRequest,
        WaitResponse,
        StatsRequest,
        StatsResponse,
        ConnectRequest,
        ConnectResponse,
        ShutdownRequest,
        PauseRequest,
        ResumeRequest,
        // containerd.types, containerd.v1.types
        Mount,
        ProcessInfo,
        // containerd.events
        TaskCreate,
        TaskStart,
        TaskDelete,
        TaskIO,
        TaskExit,
        TaskOOM,
        TaskExecAdded,
        TaskExecStarted,
        TaskPaused,
        TaskResumed,
        TaskCheckpointed,
        // containerd.services.events.ttrpc.v1
        Envelope,
        ForwardRequest,
        // io.containerd.cgroups.v2
        Metrics,
        PidsStat,
        CPUStat,
        MemoryStat,
        MemoryEvents,
        RdmaStat,
        RdmaEntry,
        IOStat,
        IOEntry,
        HugeTlbStat,
        // runtimeoptions.v1
        Options,
    );
    assert_eq!(names.len(), 52);
}

#[test]
fn full_names_are_containerds() {
    for (got, want) in [
        (type_url::<CreateTaskRequest>(), "containerd.task.v2.CreateTaskRequest"),
        (type_url::<StateResponse>(), "containerd.task.v2.StateResponse"),
        (type_url::<Mount>(), "containerd.types.Mount"),
        (type_url::<ProcessInfo>(), "containerd.v1.types.ProcessInfo"),
        (type_url::<TaskExit>(), "containerd.events.TaskExit"),
        (type_url::<TaskOOM>(), "containerd.events.TaskOOM"),
        (type_url::<TaskIO>(), "containerd.events.TaskIO"),
        (type_url::<Envelope>(), "containerd.services.events.ttrpc.v1.Envelope"),
        (
            type_url::<ForwardRequest>(),
            "containerd.services.events.ttrpc.v1.ForwardRequest",
        ),
        (type_url::<Metrics>(), "io.containerd.cgroups.v2.Metrics"),
        (type_url::<CPUStat>(), "io.containerd.cgroups.v2.CPUStat"),
        (type_url::<Options>(), "runtimeoptions.v1.Options"),
    ] {
        assert_eq!(got, want);
    }
    assert_eq!(
        <Status as protobuf::EnumFull>::enum_descriptor().full_name(),
        "containerd.v1.types.Status"
    );
}

#[test]
fn status_values_are_containerds() {
    use protobuf::{Enum, EnumFull};
    let values: Vec<(i32, String)> = Status::VALUES
        .iter()
        .map(|s| (s.value(), s.descriptor().name().to_string()))
        .collect();
    let values: Vec<(i32, &str)> = values.iter().map(|(v, n)| (*v, n.as_str())).collect();
    assert_eq!(
        values,
        [
            (0, "UNKNOWN"),
            (1, "CREATED"),
            (2, "RUNNING"),
            (3, "STOPPED"),
            (4, "PAUSED"),
            (5, "PAUSING")
        ]
    );
}

/// Hand-encoded bytes pin the field numbers and wire types independently of
/// the generated code.
#[test]
fn wire_bytes_match_containerds_numbers() {
    let exit = TaskExit {
        container_id: "c".into(),
        id: "e".into(),
        pid: 7,
        exit_status: 137,
        exited_at: Some(Timestamp {
            seconds: 1,
            nanos: 2,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    assert_eq!(
        exit.write_to_bytes().unwrap(),
        [0x0a, 1, b'c', 0x12, 1, b'e', 0x18, 7, 0x20, 0x89, 0x01, 0x2a, 4, 0x08, 1, 0x10, 2]
    );

    let state = StateResponse {
        status: Status::STOPPED.into(),
        exec_id: "x".into(),
        ..Default::default()
    };
    assert_eq!(state.write_to_bytes().unwrap(), [0x20, 3, 0x5a, 1, b'x']);

    let connect = ConnectResponse {
        shim_pid: 1,
        task_pid: 2,
        version: "v".into(),
        ..Default::default()
    };
    assert_eq!(connect.write_to_bytes().unwrap(), [0x08, 1, 0x10, 2, 0x1a, 1, b'v']);

    let create = CreateTaskRequest {
        rootfs: vec![Mount {
            type_: "t".into(),
            options: vec!["o".into()],
            ..Default::default()
        }],
        options: Some(Any::default()).into(),
        ..Default::default()
    };
    assert_eq!(
        create.write_to_bytes().unwrap(),
        [0x1a, 6, 0x0a, 1, b't', 0x22, 1, b'o', 0x52, 0]
    );

    let metrics = Metrics {
        memory: Some(MemoryStat {
            swap_limit: 1,
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            oom_kill: 1,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    // memory = 4, swap_limit = 35 (tag 0x118 as a varint: 0x98 0x02),
    // memory_events = 8, oom_kill = 5.
    assert_eq!(
        metrics.write_to_bytes().unwrap(),
        [0x22, 3, 0x98, 0x02, 1, 0x42, 2, 0x28, 1]
    );

    let options = Options {
        type_url: "u".into(),
        config_path: "p".into(),
        ..Default::default()
    };
    assert_eq!(options.write_to_bytes().unwrap(), [0x0a, 1, b'u', 0x12, 1, b'p']);

    let envelope = Envelope {
        namespace: "n".into(),
        topic: "t".into(),
        ..Default::default()
    };
    assert_eq!(envelope.write_to_bytes().unwrap(), [0x12, 1, b'n', 0x1a, 1, b't']);
}

#[test]
fn any_uses_the_bare_full_name() {
    let exit = TaskExit {
        container_id: "c1".into(),
        pid: 42,
        ..Default::default()
    };
    let any = to_any(&exit);
    assert_eq!(any.type_url, "containerd.events.TaskExit");
    assert_eq!(any.value, exit.write_to_bytes().unwrap());
    assert_eq!(from_any::<TaskExit>(&any).unwrap(), Some(exit.clone()));
    assert_eq!(from_any::<TaskOOM>(&any).unwrap(), None);

    // What protobuf's own Any::pack would write: accepted on the way in.
    let prefixed = Any::pack(&exit).unwrap();
    assert_eq!(prefixed.type_url, "type.googleapis.com/containerd.events.TaskExit");
    assert!(is::<TaskExit>(&prefixed));
    assert_eq!(from_any::<TaskExit>(&prefixed).unwrap(), Some(exit));

    // A value that does not decode as the type it claims.
    let broken = Any {
        type_url: type_url::<TaskExit>(),
        value: vec![0xff],
        ..Default::default()
    };
    assert!(from_any::<TaskExit>(&broken).is_err());

    let stats = to_any(&Metrics::default());
    assert_eq!(stats.type_url, "io.containerd.cgroups.v2.Metrics");
    let opts = to_any(&Options::default());
    assert_eq!(opts.type_url, "runtimeoptions.v1.Options");
}

#[test]
fn type_name_strips_any_prefix() {
    assert_eq!(type_name("containerd.events.TaskExit"), "containerd.events.TaskExit");
    assert_eq!(
        type_name("type.googleapis.com/containerd.events.TaskExit"),
        "containerd.events.TaskExit"
    );
    assert_eq!(
        type_name("types.containerd.io/opencontainers/runtime-spec/1/Spec"),
        "Spec"
    );
    assert_eq!(type_name(""), "");
}

fn topic_of<E: TaskEvent>() -> (String, &'static str) {
    (type_url::<E>(), E::TOPIC)
}

#[test]
fn topics_and_types() {
    let table = [
        topic_of::<TaskCreate>(),
        topic_of::<TaskStart>(),
        topic_of::<TaskDelete>(),
        topic_of::<TaskExit>(),
        topic_of::<TaskOOM>(),
        topic_of::<TaskExecAdded>(),
        topic_of::<TaskExecStarted>(),
        topic_of::<TaskPaused>(),
        topic_of::<TaskResumed>(),
        topic_of::<TaskCheckpointed>(),
    ];
    let want = [
        ("containerd.events.TaskCreate", "/tasks/create"),
        ("containerd.events.TaskStart", "/tasks/start"),
        ("containerd.events.TaskDelete", "/tasks/delete"),
        ("containerd.events.TaskExit", "/tasks/exit"),
        ("containerd.events.TaskOOM", "/tasks/oom"),
        ("containerd.events.TaskExecAdded", "/tasks/exec-added"),
        ("containerd.events.TaskExecStarted", "/tasks/exec-started"),
        ("containerd.events.TaskPaused", "/tasks/paused"),
        ("containerd.events.TaskResumed", "/tasks/resumed"),
        ("containerd.events.TaskCheckpointed", "/tasks/checkpointed"),
    ];
    let got: Vec<(&str, &str)> = table.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    assert_eq!(got, want);
}

#[test]
fn envelope_carries_topic_namespace_and_event() {
    let ev = TaskExecStarted {
        container_id: "c".into(),
        exec_id: "e".into(),
        pid: 9,
        ..Default::default()
    };
    let ts = Timestamp {
        seconds: 100,
        nanos: 5,
        ..Default::default()
    };
    let env = envelope("k8s.io", &ev, ts.clone());
    assert_eq!(env.namespace, "k8s.io");
    assert_eq!(env.topic, "/tasks/exec-started");
    assert_eq!(env.timestamp.as_ref(), Some(&ts));
    assert_eq!(env.event.type_url, "containerd.events.TaskExecStarted");
    assert_eq!(from_any::<TaskExecStarted>(&env.event).unwrap(), Some(ev.clone()));

    let req = forward_request("default", &ev);
    assert_eq!(req.envelope.topic, "/tasks/exec-started");
    assert!(req.envelope.timestamp.seconds > 0);
}

/// A shim that implements only Connect; everything else keeps the generated
/// default.
struct ConnectOnly;

#[async_trait::async_trait]
impl shim_ttrpc::Task for ConnectOnly {
    async fn connect(
        &self,
        _ctx: &::ttrpc::r#async::TtrpcContext,
        req: ConnectRequest,
    ) -> ::ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: 10,
            task_pid: 20,
            version: format!("test:{}", req.id),
            ..Default::default()
        })
    }
}

fn rpc_code(e: &::ttrpc::Error) -> ::ttrpc::Code {
    match e {
        ::ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not an RPC status: {other:?}"),
    }
}

#[tokio::test]
async fn task_trait_is_implementable_and_defaults_fail() {
    use shim_ttrpc::Task;
    let ctx = ::ttrpc::r#async::TtrpcContext::default();
    let shim = ConnectOnly;
    let resp = shim
        .connect(
            &ctx,
            ConnectRequest {
                id: "a".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.shim_pid, resp.task_pid, resp.version.as_str()),
        (10, 20, "test:a")
    );
    let err = shim.state(&ctx, StateRequest::default()).await.unwrap_err();
    assert_eq!(rpc_code(&err), ::ttrpc::Code::NOT_FOUND);

    let services = shim_ttrpc::create_task(Arc::new(ConnectOnly));
    let service = &services[TASK_SERVICE];
    let mut methods: Vec<&str> = service.methods.keys().map(String::as_str).collect();
    methods.sort_unstable();
    assert_eq!(
        methods,
        [
            "Checkpoint",
            "CloseIO",
            "Connect",
            "Create",
            "Delete",
            "Exec",
            "Kill",
            "Pause",
            "Pids",
            "ResizePty",
            "Resume",
            "Shutdown",
            "Start",
            "State",
            "Stats",
            "Update",
            "Wait"
        ]
    );
    assert!(service.streams.is_empty());
}

/// Records what Forward received, with the namespace header.
#[derive(Default)]
struct Recorder(Mutex<Vec<(Envelope, Vec<String>)>>);

#[async_trait::async_trait]
impl events_ttrpc::Events for Recorder {
    async fn forward(&self, ctx: &::ttrpc::r#async::TtrpcContext, req: ForwardRequest) -> ::ttrpc::Result<Empty> {
        let ns = ctx.metadata.get(NAMESPACE_HEADER).cloned().unwrap_or_default();
        self.0.lock().unwrap().push((req.envelope.unwrap_or_default(), ns));
        Ok(Empty::new())
    }
}

/// Both services over a real unix socket: the async server, the service
/// maps and the clients.
#[tokio::test]
async fn task_and_events_over_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("shim.sock").display());
    let recorder = Arc::new(Recorder::default());
    let mut server = ::ttrpc::r#async::Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(shim_ttrpc::create_task(Arc::new(ConnectOnly)))
        .register_service(events_ttrpc::create_events(recorder.clone()));
    server.start().await.unwrap();

    let client = ::ttrpc::r#async::Client::connect(&addr).await.unwrap();
    let task = shim_ttrpc::TaskClient::new(client.clone());
    let resp = task
        .connect(
            ::ttrpc::context::with_timeout(0),
            &ConnectRequest {
                id: "b".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(resp.version, "test:b");
    let err = task
        .stats(::ttrpc::context::with_timeout(0), &StatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), ::ttrpc::Code::NOT_FOUND);

    let events = events_ttrpc::EventsClient::new(client);
    let mut ctx = ::ttrpc::context::with_timeout(0);
    ctx.add(NAMESPACE_HEADER.to_string(), "k8s.io".to_string());
    let exit = TaskExit {
        container_id: "c".into(),
        id: "c".into(),
        pid: 3,
        exit_status: 1,
        ..Default::default()
    };
    events.forward(ctx, &forward_request("k8s.io", &exit)).await.unwrap();

    let seen = std::mem::take(&mut *recorder.0.lock().unwrap());
    assert_eq!(seen.len(), 1);
    let (env, ns) = &seen[0];
    assert_eq!(ns, &["k8s.io".to_string()]);
    assert_eq!((env.namespace.as_str(), env.topic.as_str()), ("k8s.io", "/tasks/exit"));
    assert_eq!(env.event.type_url, "containerd.events.TaskExit");
    assert_eq!(from_any::<TaskExit>(&env.event).unwrap(), Some(exit));
    server.shutdown().await.unwrap();
}
