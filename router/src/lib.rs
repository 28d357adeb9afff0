//! The Switchyard router tier: keeps the subscription index and turns each
//! producer event into one pre-targeted delivery per user.
//!
//! # Layout
//! - [`config`]: flags and `SWITCHYARD_*` variables.
//! - [`index`]: the subscription index interface and the simple scan index (pure).
//! - [`fast_index`]: the inverted index (roaring postings) the router uses (pure).
//! - [`rooms`]: room memberships (pure).
//! - [`state`]: the shared state and how control requests change it.
//! - [`control`]: the NATS service answering edges' subscription requests.
//! - [`ingest`]: producer events → deliveries.
//! - [`log`]: the delivery log stream (JetStream) that stores durable deliveries.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//!
//! [`start`] runs all of it in the current tokio runtime, so tests can embed
//! a router; `main.rs` is a thin wrapper.

pub mod admin;
pub mod config;
pub mod control;
pub mod fast_index;
pub mod index;
pub mod ingest;
pub mod log;
pub mod rooms;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::RouterConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// NATS could not be reached.
    #[error("cannot connect to NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
    /// The delivery log stream could not be created.
    #[error("cannot create the delivery log stream: {0}")]
    Log(#[from] async_nats::jetstream::context::CreateStreamError),
    /// A NATS subscription failed.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The admin port could not be bound.
    #[error("cannot bind the admin endpoint: {0}")]
    Bind(#[from] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

/// A running router.
pub struct RunningRouter {
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// The shared state (for inspection in tests).
    pub state: Arc<state::RouterState>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    client: async_nats::Client,
}

impl RunningRouter {
    /// Stops every task, flushes pending publishes and waits (bounded) for the tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("router tasks did not stop within 5 s");
        }
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "flush at shutdown failed");
        }
    }

    /// A token that stops the router when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Connects to NATS and starts the control service, ingest and admin endpoint.
pub async fn start(config: RouterConfig) -> Result<RunningRouter, StartError> {
    let subjects = config.validate()?;
    let metrics = match config.metrics.clone() {
        Some(h) => h,
        None => admin::install_recorder()?,
    };
    let client = async_nats::ConnectOptions::new()
        .name("switchyard-router")
        .retry_on_initial_connect()
        // SWITCHYARD_NATS_URL may list several servers, comma separated.
        .connect(config.nats_url.split(',').map(str::trim).collect::<Vec<_>>())
        .await?;
    // retry_on_initial_connect returns at once; wait (bounded) for the first connection.
    wait_connected(&client).await;
    let js = async_nats::jetstream::new(client.clone());
    log::ensure_stream(&js, &subjects, &config.log_settings()).await?;
    let state = state::RouterState::new(config.max_subscriptions);
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let ingest = ingest::Ingest::new(
        client.clone(),
        subjects.clone(),
        state.clone(),
        ingest::dedup_cache(Duration::from_secs(config.dedup_window_s)),
    );
    // Subscribe before returning so that a started router already receives events.
    let control_sub = control::subscribe(&client, &subjects).await?;
    let events_sub = ingest.subscribe().await?;
    tasks.spawn(control::serve(
        client.clone(),
        control_sub,
        state.clone(),
        cancel.clone(),
    ));
    tasks.spawn(ingest.run(events_sub, cancel.clone()));
    let listener = tokio::net::TcpListener::bind(config.admin_listen).await?;
    let admin_addr = listener.local_addr()?;
    let ready_client = client.clone();
    let ready: admin::ReadyCheck =
        Arc::new(move || ready_client.connection_state() == async_nats::connection::State::Connected);
    tasks.spawn(admin::serve(listener, ready, metrics, cancel.clone()));
    // A round trip to the server proves the subscriptions above are in place.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flush after subscribing failed");
    }
    tracing::info!(%admin_addr, nats = %config.nats_url, prefix = %subjects.prefix(), "router started");
    Ok(RunningRouter {
        admin_addr,
        state,
        cancel,
        tasks,
        client,
    })
}

async fn wait_connected(client: &async_nats::Client) {
    for _ in 0..500 {
        if client.connection_state() == async_nats::connection::State::Connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
