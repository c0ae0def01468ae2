//! Task events to containerd: `Events/Forward` on containerd's ttrpc
//! socket (`TTRPC_ADDRESS`), in the order they were published.
//!
//! [`Publisher::publish`] only queues (it may be called from any thread,
//! async or not); one task sends, reconnecting when containerd went away
//! (a restart), and drops an event only after [`SEND_ATTEMPTS`] failures.
//! Without `TTRPC_ADDRESS` events are only logged.

use std::collections::HashMap;
use std::time::Duration;

use tegmen_shim_api::events::ForwardRequest;
use tegmen_shim_api::events_ttrpc::EventsClient;
use tegmen_shim_api::{forward_request, TaskEvent, NAMESPACE_HEADER};
use tokio::sync::mpsc;

const SEND_ATTEMPTS: u32 = 50;
const RETRY_PAUSE: Duration = Duration::from_millis(200);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Publisher {
    namespace: String,
    queue: mpsc::UnboundedSender<(String, ForwardRequest)>,
}

impl Publisher {
    /// Starts the sending task on the current tokio runtime.
    pub fn start(namespace: &str, ttrpc_address: Option<String>) -> Publisher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(namespace.to_string(), ttrpc_address, rx));
        Publisher {
            namespace: namespace.to_string(),
            queue: tx,
        }
    }

    pub fn publish<E: TaskEvent>(&self, event: &E) {
        tracing::debug!(topic = E::TOPIC, "publishing");
        let _ = self
            .queue
            .send((E::TOPIC.to_string(), forward_request(&self.namespace, event)));
    }
}

async fn connect(address: &str) -> Option<EventsClient> {
    let address = if address.contains("://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    };
    ttrpc::asynchronous::Client::connect(&address)
        .await
        .map_err(|e| tracing::warn!("events: connecting to {address}: {e}"))
        .ok()
        .map(EventsClient::new)
}

async fn send_loop(
    namespace: String,
    address: Option<String>,
    mut rx: mpsc::UnboundedReceiver<(String, ForwardRequest)>,
) {
    let mut client: Option<EventsClient> = None;
    while let Some((topic, req)) = rx.recv().await {
        let Some(address) = address.as_deref() else {
            tracing::info!(topic, "event (no TTRPC_ADDRESS to publish it to)");
            continue;
        };
        let mut sent = false;
        for _ in 0..SEND_ATTEMPTS {
            if client.is_none() {
                client = connect(address).await;
            }
            let Some(c) = client.as_ref() else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let mut md = HashMap::new();
            md.insert(NAMESPACE_HEADER.to_string(), vec![namespace.clone()]);
            let mut ctx = ttrpc::context::with_metadata(md);
            ctx.timeout_nano = SEND_TIMEOUT.as_nanos() as i64;
            match c.forward(ctx, &req).await {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(topic, "events: forwarding: {e}");
                    client = None;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        if !sent {
            tracing::error!(topic, "events: dropped after {SEND_ATTEMPTS} attempts");
        }
    }
}
