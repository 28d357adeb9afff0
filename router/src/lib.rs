//! The Switchyard router tier: keeps the subscription index, matches each
//! producer event (match stage) and stores and sends each user's deliveries,
//! grouped per edge (delivery stage).
//!
//! # Layout
//! - [`config`]: flags and `SWITCHYARD_*` variables.
//! - [`index`]: the subscription index interface and the simple scan index (pure).
//! - [`fast_index`]: the inverted index (roaring postings) the router uses (pure).
//! - [`rooms`]: room memberships (pure).
//! - [`change`]: a stored change to subscriptions or rooms, and its key and value (pure).
//! - [`state`]: the shared state, checks on requests, applying stored changes.
//! - [`store`]: subscriptions and memberships persisted in a JetStream bucket, watched.
//! - [`authz`]: who may join which room and use which subscription type.
//! - [`control`]: the NATS service answering edges' subscription requests.
//! - [`api`]: the application API (disconnect, revoke, subscriptions, presence, stats) and the routers' answers to it.
//! - [`gather`]: one request to every live edge or router, every answer awaited.
//! - [`events`]: the partitioned event streams producers publish into.
//! - [`lease`]: which router processes which partition, with failover.
//! - [`ingest`]: the match stage: producer events → targets per user partition, one worker per owned event partition.
//! - [`targeting`]: one event → its users and bodies, by user partition (pure).
//! - [`handoff`]: grouping one event's (user, body) pairs by user partition (pure).
//! - [`delivery`]: the delivery stage: stores each user's deliveries and sends live copies per edge, one worker per owned user partition.
//! - [`presence`]: which edges hold which users of a partition (pure).
//! - [`batches`]: live batches per edge, bodies once, cut below NATS' max payload (pure).
//! - [`edges`]: which edges and routers are alive (their heartbeats).
//! - [`latest`]: the latest keyed event per key (a stream, copied into memory), for snapshots.
//! - [`log`]: the delivery log streams and the hand-off stream (JetStream).
//! - [`fault`]: crash injection for failover tests (cargo feature `fault-injection` only).
//! - [`workqueue`]: taking over a slice of a work-queue stream (the consumer both stages use).
//!
//! The admin endpoint, the NATS connection and the signal handling come
//! from `switchyard-runtime`, shared with the edge.
//!
//! [`start`] runs all of it in the current tokio runtime, so tests can embed
//! a router; `main.rs` is a thin wrapper.

pub mod api;
pub mod authz;
pub mod batches;
pub mod change;
pub mod config;
pub mod control;
pub mod delivery;
pub mod edges;
pub mod events;
pub mod fast_index;
pub mod fault;
pub mod gather;
pub mod handoff;
pub mod index;
pub mod ingest;
pub mod latest;
pub mod lease;
pub mod log;
pub mod presence;
pub mod rooms;
pub mod state;
pub mod store;
pub mod targeting;
pub mod workqueue;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::RouterConfig;
use switchyard_common::subject::{Subjects, ROUTER_QUEUE_GROUP};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("invalid configuration")]
    Config(#[from] config::ConfigError),
    /// What both tiers can fail at: NATS, a listener, the metrics recorder.
    #[error(transparent)]
    Runtime(#[from] switchyard_runtime::StartError),
    /// The delivery log or an event stream could not be created.
    #[error("cannot create a stream")]
    Stream(#[from] async_nats::jetstream::context::CreateStreamError),
    /// The subscription bucket could not be opened or replayed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// The latest-event store could not be set up.
    #[error(transparent)]
    Latest(#[from] latest::LatestError),
    /// The revocation bucket could not be opened.
    #[error(transparent)]
    Revocations(#[from] switchyard_runtime::nats::KvOpenError),
}

impl StartError {
    /// Whether the operator's configuration is at fault (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
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
        // Bounded: with NATS gone a flush would wait for a reconnect forever.
        match tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "flush at shutdown failed"),
            Err(_) => tracing::warn!("flush at shutdown timed out"),
            Ok(Ok(())) => {}
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
        None => switchyard_runtime::admin::install_recorder(&[]).map_err(switchyard_runtime::StartError::from)?,
    };
    // Counts (re)connections: consumers and the bucket watch are rebuilt after
    // a reconnect rather than trusted to resume by themselves.
    let (reconnects_tx, reconnects) = tokio::sync::watch::channel(0u64);
    let options = async_nats::ConnectOptions::new()
        .name("switchyard-router")
        .event_callback(move |event| {
            let tx = reconnects_tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tx.send_modify(|n| *n += 1);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    let client = switchyard_runtime::nats::connect(options, &config.nats)
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    let js = async_nats::jetstream::new(client.clone());
    log::ensure_streams(&js, &subjects, &config.log_settings()).await?;
    events::ensure_streams(&js, &subjects, &config.event_settings()).await?;
    let store = store::Store::open(&js, &subjects, &config.store_settings()).await?;
    let state = state::RouterState::new(config.limits());
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    // The index is rebuilt from the bucket before anything is served.
    let watcher = store
        .start_watcher(state.clone(), reconnects.clone(), cancel.clone())
        .await?;
    tasks.spawn(async move {
        let _ = watcher.await;
    });
    tracing::info!(
        subscriptions = state.subscription_count(),
        revision = store.applied(),
        "subscription index rebuilt"
    );

    let (latest, copy_latest) =
        latest::Latest::start(js.clone(), subjects.clone(), config.latest_settings(), cancel.clone()).await?;
    tasks.spawn(copy_latest);
    let control = Arc::new(control::ControlService {
        latest: latest.clone(),
        client: client.clone(),
        state: state.clone(),
        store: store.clone(),
        authz: authz::Authz::new(config.authz_settings(), client.clone(), subjects.clone()),
    });
    let control_sub = control::subscribe(&client, &subjects)
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    tasks.spawn(control.clone().serve(control_sub, cancel.clone()));

    let ttl = config.lease_ttl;
    let lease_bucket = lease::bucket_config(&subjects, ttl, config.log_replicas, config.log_storage);
    let leases = lease::open_bucket(&js, &lease_bucket).await?;
    // Ingest keeps its own bound on outstanding publish acknowledgements.
    let ingest_js = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(ingest::JS_MAX_ACK_INFLIGHT)
        .build(client.clone());
    let shared = Arc::new(ingest::Shared {
        client: client.clone(),
        js: ingest_js,
        subjects: subjects.clone(),
        state: state.clone(),
        store: store.clone(),
        dedup: ingest::dedup_cache(config.dedup_window),
        user_partitions: config.user_partitions,
        latest,
    });
    let (edge_set, edge_tracker) = edges::track(client.clone(), &subjects, config.edge_timeout, cancel.clone())
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    tasks.spawn(edge_tracker);
    let delivery = Arc::new(delivery::Shared {
        client: client.clone(),
        js: shared.js.clone(),
        subjects: subjects.clone(),
        user_partitions: config.user_partitions,
        log_groups: config.log_streams,
        log: config.log_settings(),
        edges: edge_set,
        sync_wait: config.presence_sync,
        // Edges beat every second: after this long every live one has been heard.
        edges_known_at: tokio::time::Instant::now() + EDGE_HEARTBEAT + Duration::from_millis(300),
        crash: fault::CrashAfter::from_env(),
        failed_stores: Default::default(),
        present_users: Default::default(),
    });
    let units = events::Partition::all(config.partitions)
        .into_iter()
        .map(lease::Unit::Events)
        .chain((0..config.user_partitions).map(lease::Unit::Users))
        .collect();
    let router_id = config.router_id();
    let (router_set, router_tracker) = edges::track_routers(client.clone(), &subjects, ttl, cancel.clone())
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    tasks.spawn(router_tracker);
    tasks.spawn(api::serve_router_questions(
        client.clone(),
        subjects.clone(),
        router_id.clone(),
        delivery.clone(),
        cancel.clone(),
    ));
    let revocations = switchyard_runtime::nats::open_or_create_kv(
        &js,
        &switchyard_runtime::nats::revocation_bucket(
            subjects.revocation_bucket(),
            config.log_storage,
            config.log_replicas,
        ),
    )
    .await?;
    let api_service = api::ApiService {
        client: client.clone(),
        subjects: subjects.clone(),
        control: control.clone(),
        revocations,
        js: js.clone(),
        max_token_lifetime: config.max_token_lifetime,
        wait: config.api_wait,
        edges: delivery.edges.clone(),
        routers: router_set,
        edges_known_at: delivery.edges_known_at,
    };
    let api_sub = api::subscribe(&client, &subjects)
        .await
        .map_err(switchyard_runtime::StartError::from)?;
    tasks.spawn(api_service.serve(api_sub, cancel.clone()));
    let supervisor = lease::Supervisor::new(router_id, leases, lease_bucket, shared, delivery, units, ttl);
    let heartbeats = supervisor.heartbeats().await?;
    tasks.spawn(supervisor.run(heartbeats, reconnects.clone(), cancel.clone()));
    tasks.spawn(count_malformed_subjects(
        client.clone(),
        subjects.clone(),
        cancel.clone(),
    ));
    let (listener, admin_addr) = switchyard_runtime::bind(config.admin_listen).await?;
    let ready_client = client.clone();
    let ready: switchyard_runtime::admin::ReadyCheck =
        Arc::new(move || ready_client.connection_state() == async_nats::connection::State::Connected);
    tasks.spawn(switchyard_runtime::admin::serve(
        listener,
        ready,
        metrics,
        cancel.clone(),
    ));
    // A round trip to the server proves the subscriptions above are in place.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flush after subscribing failed");
    }
    tracing::info!(%admin_addr, nats = %config.nats.nats_url, prefix = %subjects.prefix(), "router started");
    Ok(RunningRouter {
        admin_addr,
        state,
        cancel,
        tasks,
        client,
    })
}

/// How often edges publish their heartbeat (`switchyard_edge::presence::HEARTBEAT`).
const EDGE_HEARTBEAT: Duration = Duration::from_secs(1);

/// Counts producer events on subjects deeper than `<prefix>.events.<type>.<key>`,
/// which no event stream captures (a JetStream publish there gets "no responders").
async fn count_malformed_subjects(client: async_nats::Client, subjects: Subjects, cancel: CancellationToken) {
    use futures::StreamExt;
    let Ok(mut sub) = client
        .queue_subscribe(subjects.events_too_deep(), ROUTER_QUEUE_GROUP.to_string())
        .await
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => {
                    metrics::counter!("switchyard_router_events_malformed_total", "reason" => "subject").increment(1);
                    tracing::warn!(subject = %m.subject, "event on a subject outside <prefix>.events.<type>[.<key>] dropped");
                }
                None => return,
            },
        }
    }
}
