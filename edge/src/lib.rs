//! The Switchyard edge tier: terminates WebSocket connections, authenticates
//! users and delivers each user's events to every one of their connections.
//!
//! The edge is stateless beyond its connections: subscriptions live in the
//! router tier, deliveries arrive pre-targeted on per-user NATS subjects.
//!
//! # Layout
//! - [`config`]: flags and `SWITCHYARD_*` variables.
//! - [`auth`]: JWT verification; the user id is the token's `sub`.
//! - [`server`]: HTTP up to the WebSocket upgrade (status-code refusals).
//! - [`session`]: one connection's reader and writer.
//! - [`wsread`]: WebSocket frame reading with no buffer between frames.
//! - [`outbound`]: the per-connection queue policy: rate limit, conflation, slow-consumer drops (pure).
//! - [`conn`]: the handle and bounded queues of one connection.
//! - [`hub`]: user → connections, per-user NATS subscriptions, broadcasts, the sweeper.
//! - [`log`]: the delivery log: positions, replay on resume, `recovered`.
//! - [`backend`]: requests to the router tier and rpc applications.
//! - [`node`]: what all connections share (limits, drain flag).
//! - [`tls`]: rustls for `wss://`.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod config;
pub mod conn;
pub mod hub;
pub mod log;
pub mod node;
pub mod outbound;
pub mod server;
pub mod session;
pub mod tls;
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
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// NATS could not be reached.
    #[error("cannot connect to NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
    /// A NATS subscription failed.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The delivery log is not there.
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// A verification key is unusable.
    #[error("invalid token verification settings: {0}")]
    Auth(#[from] auth::AuthConfigError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

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
        let spread = Duration::from_millis(self.node.config.drain_spread_ms);
        self.node.hub.drain(spread).await;
        let gone = self
            .node
            .hub
            .wait_empty(Duration::from_millis(self.node.config.drain_timeout_ms))
            .await;
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
        None => admin::install_recorder()?,
    };
    let client = async_nats::ConnectOptions::new()
        .name("switchyard-edge")
        .retry_on_initial_connect()
        .connect(config.nats_url.as_str())
        .await?;
    for _ in 0..500 {
        if client.connection_state() == async_nats::connection::State::Connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let verifier = auth::Verifier::new(&config.auth_settings())?;
    let sweep = hub::SweepConfig {
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        slow_consumer: Duration::from_millis(config.slow_consumer_ms),
    };
    let hub = hub::Hub::start(client.clone(), subjects.clone(), sweep, tasks.clone(), cancel.clone()).await?;
    let log_wait = Duration::from_millis(config.log_wait_ms);
    let log = log::DeliveryLog::open(async_nats::jetstream::new(client.clone()), subjects.clone(), log_wait).await?;
    let backend = backend::Backend::new(client.clone(), subjects.clone(), config.request_timeout());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let ws_addr = listener.local_addr()?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen).await?;
    let admin_addr = admin_listener.local_addr()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let node = Arc::new(node::Node::new(
        config,
        verifier,
        hub,
        backend,
        log,
        client.clone(),
        cancel.clone(),
        tasks.clone(),
    ));
    let ready_client = client.clone();
    let ready_node = node.clone();
    let ready: admin::ReadyCheck = Arc::new(move || {
        !ready_node.cancel.is_cancelled()
            && !ready_node.draining.load(std::sync::atomic::Ordering::Relaxed)
            && ready_client.connection_state() == async_nats::connection::State::Connected
    });
    tasks.spawn(admin::serve(admin_listener, ready, metrics, cancel.clone()));
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flush after subscribing failed");
    }
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
