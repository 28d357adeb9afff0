//! The Switchyard edge tier: terminates WebSocket connections, authenticates
//! users and delivers each user's events to every one of their connections.
//!
//! The edge is stateless beyond its connections: subscriptions live in the
//! router tier; deliveries arrive pre-targeted, grouped for this node, on
//! one NATS subject per node, and are dispatched to the named users'
//! connections.
//!
//! # Layout
//! - [`config`]: flags and `SWITCHYARD_*` variables.
//! - [`auth`]: JWT verification; the user id is the token's `sub`.
//! - [`server`]: HTTP up to the WebSocket upgrade (status-code refusals).
//! - [`session`]: one connection's reader and writer.
//! - [`wsread`]: WebSocket message reading (RFC 6455 rules, no buffer between frames).
//! - [`deflate`]: permessage-deflate (RFC 7692): the offer, compressing and inflating.
//! - [`outbound`]: the per-connection queue policy: rate limit, conflation, slow-consumer drops (pure).
//! - [`throttle`]: per-key throttling of deliveries for `throttle_ms` subscriptions (pure).
//! - [`snapshot`]: keeping a subscription's snapshot in order with its live events (pure).
//! - [`op_limit`]: the per-connection rate limit on client ops (pure).
//! - [`conn`]: the handle and bounded queues of one connection.
//! - [`hub`]: the node's connections, registration, draining, the sweeper.
//! - [`intake`]: the node's one live subscription and the user → connections table it dispatches to.
//! - [`presence`]: announcing this node's users to their delivery partitions (batched), heartbeats.
//! - [`log`]: the delivery log: replay on resume, `recovered`.
//! - [`backend`]: requests to the router tier and rpc applications.
//! - [`revocations`]: the token revocations in force, watched from their bucket.
//! - [`commands`]: the router tier's commands to every edge (application API: disconnect, counts).
//! - [`node`]: what all connections share (limits, drain flag).
//! - [`tls`]: rustls for `wss://`.
//! - `demo`: the optional demo page under `/demo/` and its dev-token endpoint
//!   (cargo feature `demo`, on by default).
//!
//! The admin endpoint (`/healthz`; `/readyz`, which turns 503 while draining;
//! `/metrics`), the NATS connection and the signal handling come from
//! `switchyard-runtime`, shared with the router.

pub mod auth;
pub mod backend;
pub mod broadcasts;
pub mod commands;
pub mod config;
pub mod conn;
pub mod control_queue;
pub mod deflate;
#[cfg(feature = "demo")]
pub mod demo;
pub mod hub;
pub mod intake;
pub mod log;
pub mod node;
pub mod op_limit;
pub mod outbound;
pub mod presence;
pub mod revocations;
pub mod server;
pub mod session;
pub mod snapshot;
#[cfg(test)]
mod test_support;
pub mod throttle;
pub mod tls;
pub mod wsframe;
pub mod wsread;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::EdgeConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("invalid configuration")]
    Config(#[from] config::ConfigError),
    /// What both tiers can fail at: NATS, a listener, the metrics recorder.
    #[error(transparent)]
    Runtime(#[from] switchyard_runtime::StartError),
    /// The delivery log is not there.
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// A verification key is unusable.
    #[error("invalid token verification settings")]
    Auth(#[from] auth::AuthConfigError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The revocations in force could not be loaded.
    #[error(transparent)]
    Revocations(#[from] revocations::RevocationError),
}

impl StartError {
    /// Whether the operator's configuration is at fault (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_) | StartError::Auth(_) | StartError::Tls(_))
    }
}

/// Delivery latency buckets, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The histograms of the edge's metrics (the rest are counters and gauges):
/// `switchyard_edge_delivery_latency_seconds` with [`LATENCY_BUCKETS`].
pub const HISTOGRAMS: &[(&str, &[f64])] = &[("switchyard_edge_delivery_latency_seconds", LATENCY_BUCKETS)];

/// A running edge.
pub struct RunningEdge {
    /// Where WebSocket clients connect (`ws://ADDR/ws`, or `wss://` with TLS).
    pub ws_addr: SocketAddr,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    node: Arc<node::Node>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl RunningEdge {
    /// Drains the node: readiness turns 503, new upgrades get 503, every
    /// client gets `reconnect` (delays spread over the configured window)
    /// and a 1001 close; returns when all connections are gone or the drain
    /// timeout passes. Call [`RunningEdge::shutdown`] afterwards.
    pub async fn drain(&self) -> bool {
        self.node.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        let spread = self.node.config.drain_spread;
        self.node.hub.drain(spread);
        let gone = self.node.hub.wait_empty(self.node.config.drain_timeout).await;
        if !gone {
            tracing::warn!("drain timeout passed with connections still open");
        }
        gone
    }

    /// Closes every connection (1001) and waits, bounded, for the tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("edge tasks did not stop within 5 s");
        }
    }
}

/// Connects to NATS, binds the listeners and starts serving.
pub async fn start(config: EdgeConfig) -> Result<RunningEdge, StartError> {
    let subjects = config.validate()?;
    if !config.has_key() {
        tracing::warn!("DEV MODE: no JWT key configured; accepting tokens signed with the built-in dev secret. Never run this in production.");
    }
    let metrics = match config.metrics.clone() {
        Some(h) => h,
        None => {
            switchyard_runtime::admin::install_recorder(HISTOGRAMS).map_err(switchyard_runtime::StartError::from)?
        }
    };
    // Counts moments when live deliveries may have been missed (a reconnect
    // after a disconnect, messages dropped by the client); see `resync`.
    let (gaps_tx, gaps) = tokio::sync::watch::channel(0u64);
    let disconnected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = async_nats::ConnectOptions::new()
        .name("switchyard-edge")
        .event_callback(move |event| {
            let gaps_tx = gaps_tx.clone();
            let disconnected = disconnected.clone();
            async move {
                let gap = match &event {
                    async_nats::Event::Disconnected => {
                        disconnected.store(true, std::sync::atomic::Ordering::Relaxed);
                        false
                    }
                    async_nats::Event::Connected => disconnected.swap(false, std::sync::atomic::Ordering::Relaxed),
                    async_nats::Event::SlowConsumer(_) => true,
                    _ => false,
                };
                if gap {
                    gaps_tx.send_modify(|n| *n += 1);
                }
                nats_event(event)
            }
        });
    let client = switchyard_runtime::nats::connect(options, &config.nats)
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    metrics::gauge!("switchyard_edge_nats_connected").set(if connected { 1.0 } else { 0.0 });
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let verifier = auth::Verifier::new(&config.auth_settings())?;
    let sweep = hub::SweepConfig {
        heartbeat: config.heartbeat,
        slow_consumer: config.slow_consumer,
    };
    let table = Arc::new(intake::UserTable::new(config.user_partitions));
    let hub = hub::Hub::start(table.clone(), sweep, &tasks, cancel.clone());
    let log = log::DeliveryLog::open(
        async_nats::jetstream::new(client.clone()),
        subjects.clone(),
        config.user_partitions,
        config.log_wait,
    )
    .await?;
    // Nobody is served before the revocations in force are known.
    let (revocations, keep_revocations) = revocations::load(
        &async_nats::jetstream::new(client.clone()),
        switchyard_runtime::nats::revocation_bucket(
            subjects.revocation_bucket(),
            switchyard_runtime::nats::Storage::File,
            1,
        ),
        table.clone(),
        cancel.clone(),
    )
    .await?;
    tasks.spawn(keep_revocations);
    let backend = backend::Backend::new(client.clone(), subjects.clone(), config.request_timeout);
    let (listener, ws_addr) = switchyard_runtime::bind(config.listen).await?;
    let (admin_listener, admin_addr) = switchyard_runtime::bind(config.admin_listen).await?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key.expose())?),
        _ => None,
    };
    let node = Arc::new(node::Node::new(
        config,
        verifier,
        hub,
        backend,
        log,
        revocations.clone(),
        client.clone(),
        cancel.clone(),
        tasks.clone(),
    ));
    let ready_client = client.clone();
    let ready_node = node.clone();
    let ready: switchyard_runtime::admin::ReadyCheck = Arc::new(move || {
        !ready_node.cancel.is_cancelled()
            && !ready_node.draining.load(std::sync::atomic::Ordering::Relaxed)
            && ready_client.connection_state() == async_nats::connection::State::Connected
    });
    tasks.spawn(switchyard_runtime::admin::serve(
        admin_listener,
        ready,
        metrics,
        cancel.clone(),
    ));
    // The node's one live subscription, then presence: routers learn of
    // this node (heartbeat) only once it can take deliveries.
    let intake_sub = client
        .subscribe(subjects.edge(&node.node_id))
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flush after subscribing failed");
    }
    tasks.spawn(intake::dispatch(intake_sub, table.clone(), cancel.clone()));
    let command_sub = client
        .subscribe(subjects.edges_command())
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    let commands = commands::Commands {
        client: client.clone(),
        edge: node.node_id.clone(),
        table: table.clone(),
        revocations,
    };
    tasks.spawn(commands.serve(command_sub, cancel.clone()));
    tasks.spawn(presence::run(
        client.clone(),
        subjects.clone(),
        node.node_id.clone(),
        table,
        cancel.clone(),
    ));
    tasks.spawn(resync(gaps, node.hub.clone(), cancel.clone()));
    let wss = tls.is_some();
    tasks.spawn(server::serve(listener, node.clone(), tls));
    tracing::info!(%ws_addr, %admin_addr, wss, prefix = %subjects.prefix(), "edge started");
    Ok(RunningEdge {
        ws_addr,
        admin_addr,
        node,
        cancel,
        tasks,
    })
}

/// How widely the reconnects after a NATS gap are spread.
const RESYNC_SPREAD: Duration = Duration::from_secs(2);

/// After a gap in the live deliveries (NATS reconnected, or the client
/// dropped messages), every connection may have missed durable events that
/// the log holds; the edge cannot tell which. It tells every client to
/// reconnect (`reconnect`, reason `resync`, delays spread over 2 s) and
/// resume: the log fills the gap, exactly once.
async fn resync(mut gaps: tokio::sync::watch::Receiver<u64>, hub: hub::Hub, cancel: CancellationToken) {
    gaps.mark_unchanged();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = gaps.changed() => {
                if changed.is_err() {
                    return;
                }
                tracing::warn!("live deliveries may have a gap: clients are asked to reconnect and resume");
                metrics::counter!("switchyard_edge_resyncs_total").increment(1);
                // Delivery partitions may have forgotten this node meanwhile.
                hub.table().resync_all();
                hub.reconnect_all(RESYNC_SPREAD, "resync");
            }
        }
    }
}

/// Counts what the NATS client reports, for the operators' alerts: lost
/// connections (`switchyard_edge_nats_disconnects_total`, and the
/// `switchyard_edge_nats_connected` gauge) and messages the client dropped
/// because a subscription's channel was full
/// (`switchyard_edge_nats_slow_consumers_total`).
fn nats_event(event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            tracing::info!("NATS connected");
            metrics::gauge!("switchyard_edge_nats_connected").set(1.0);
        }
        async_nats::Event::Disconnected => {
            tracing::warn!("NATS disconnected");
            metrics::counter!("switchyard_edge_nats_disconnects_total").increment(1);
            metrics::gauge!("switchyard_edge_nats_connected").set(0.0);
        }
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!(sid, "NATS client dropped messages: a subscription was too slow");
            metrics::counter!("switchyard_edge_nats_slow_consumers_total").increment(1);
        }
        other => tracing::info!(event = %other, "NATS event"),
    }
}
