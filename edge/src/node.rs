//! What every connection on this node shares: settings, verifier, hub,
//! backend, the NATS client, and the node's shutdown signal and task tracker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Claims, Verifier};
use crate::backend::Backend;
use crate::config::EdgeConfig;
use crate::hub::Hub;
use crate::log::DeliveryLog;
use crate::revocations::Revocations;

/// Connections that may read the delivery log at once (see [`Node::log_slots`]).
pub const LOG_READERS: usize = 64;

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
    /// The token revocations in force.
    pub revocations: Arc<Revocations>,
    /// The node's NATS client.
    pub client: async_nats::Client,
    /// Connection slots of this node (a permit per connection).
    pub conn_slots: Arc<Semaphore>,
    /// Connections per user on this node.
    pub user_slots: Arc<UserSlots>,
    /// Connections resuming from the delivery log at once (the `recovered`
    /// check and replay). In a reconnect storm every client resumes at once;
    /// past this many, connections wait their turn here instead of piling
    /// JetStream API requests onto NATS until they time out.
    pub log_slots: Semaphore,
    /// Set on SIGTERM: readiness fails and new upgrades are refused.
    pub draining: AtomicBool,
    /// This node's id: its live subject is `<prefix>.edge.<node_id>`, and
    /// it prefixes connection ids.
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
        revocations: Arc<Revocations>,
        client: async_nats::Client,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Node {
        let (config_max_connections, config_max_per_user) = (config.max_connections, config.max_connections_per_user);
        // Random per process (std's hasher keys are seeded from the OS), so
        // pods that all run as pid 1 still get distinct ids.
        let node_id = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            format!("{:016x}", h.finish())
        };
        Node {
            config,
            verifier,
            hub,
            backend,
            log,
            revocations,
            client,
            node_id,
            cancel,
            tasks,
            next_conn: AtomicU64::new(1),
            conn_slots: Arc::new(Semaphore::new(config_max_connections)),
            user_slots: Arc::new(UserSlots {
                max: config_max_per_user,
                counts: Mutex::new(HashMap::new()),
            }),
            draining: AtomicBool::new(false),
            log_slots: Semaphore::new(LOG_READERS),
        }
    }

    /// Verifies a token, and refuses it when the application revoked it.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verifier.verify(token)?;
        if self.revocations.is_revoked(&claims.sub, &claims.token_id()) {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Counts each user's connections on this node against a maximum.
pub struct UserSlots {
    max: u32,
    counts: Mutex<HashMap<Arc<str>, u32>>,
}

impl UserSlots {
    /// Takes a slot for `user`, or `None` when the user is at the maximum.
    pub fn try_acquire(self: &Arc<Self>, user: &str) -> Option<UserSlot> {
        let mut counts = self.counts.lock().expect("user slots lock");
        let n = counts.entry(Arc::from(user)).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            slots: self.clone(),
            user: Arc::from(user),
        })
    }
}

/// One connection's slot; released on drop.
pub struct UserSlot {
    slots: Arc<UserSlots>,
    user: Arc<str>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().expect("user slots lock");
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}
