//! What every connection on this node shares: settings, verifier, hub,
//! backend, the NATS client, and the node's shutdown signal and task tracker.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::backend::Backend;
use crate::config::EdgeConfig;
use crate::hub::Hub;
use crate::log::DeliveryLog;

/// Node-wide shared state, behind an `Arc`.
pub struct Node {
    /// Effective configuration.
    pub config: EdgeConfig,
    /// Token verifier.
    pub verifier: Verifier,
    /// User → connections.
    pub hub: Hub,
    /// Router tier and applications.
    pub backend: Backend,
    /// The delivery log (positions, replay).
    pub log: DeliveryLog,
    /// The node's NATS client.
    pub client: async_nats::Client,
    /// Prefix of this node's connection ids.
    pub node_id: String,
    /// Fires when the node shuts down.
    pub cancel: CancellationToken,
    /// Every task the node spawned.
    pub tasks: TaskTracker,
    next_conn: AtomicU64,
}

impl Node {
    /// Assembles the node state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: EdgeConfig,
        verifier: Verifier,
        hub: Hub,
        backend: Backend,
        log: DeliveryLog,
        client: async_nats::Client,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Node {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let node_id = format!("{:x}{:x}", std::process::id(), started & 0xff_ffff);
        Node {
            config,
            verifier,
            hub,
            backend,
            log,
            client,
            node_id,
            cancel,
            tasks,
            next_conn: AtomicU64::new(1),
        }
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}
