//! Router configuration from flags and `SWITCHYARD_*` environment variables.
//!
//! Parsed and validated once at start; a bad value exits with code 64.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_common::subject::Subjects;
use switchyard_runtime::config;
use switchyard_runtime::logging::LogFormat;
use switchyard_runtime::nats::Storage;

/// Everything a router needs to run.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard-router",
    version,
    about = "Switchyard router: subscription index and targeted deliveries"
)]
pub struct RouterConfig {
    /// NATS and the subject prefix (shared with the other tier).
    #[command(flatten)]
    pub nats: switchyard_runtime::config::NatsArgs,
    /// Admin endpoint (health, readiness, metrics).
    #[arg(long, env = "SWITCHYARD_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    pub admin_listen: SocketAddr,
    /// Most subscriptions one user may hold.
    #[arg(long, env = "SWITCHYARD_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,
    /// Most rooms one user may be in (a join beyond it gets `too_many_rooms`).
    #[arg(long, env = "SWITCHYARD_MAX_ROOMS_PER_USER", default_value_t = 100)]
    pub max_rooms_per_user: usize,
    /// Largest size of the subscription bucket (`<PREFIX>_SUBS`), in bytes; when
    /// full, changes that add data get `unavailable` (removals still work).
    #[arg(long, env = "SWITCHYARD_SUBS_MAX_BYTES", default_value_t = 1 << 30)]
    pub subs_max_bytes: i64,
    /// How long the record of a removed subscription or membership stays in
    /// the bucket before the server deletes it, in seconds. A router whose
    /// watcher was cut off for most of this long rebuilds its index in full.
    #[arg(long = "subs-tombstone-ttl-s", env = "SWITCHYARD_SUBS_TOMBSTONE_TTL_S", value_parser = config::secs, default_value = "3600")]
    pub subs_tombstone_ttl: Duration,
    /// Window in which events with the same producer `id` are delivered once, in seconds.
    #[arg(long = "dedup-window-s", env = "SWITCHYARD_DEDUP_WINDOW_S", value_parser = config::secs, default_value = "120")]
    pub dedup_window: Duration,
    /// Delivery log: messages kept per user (and for broadcasts).
    #[arg(long, env = "SWITCHYARD_LOG_MAX_PER_USER", default_value_t = 1000)]
    pub log_max_per_user: i64,
    /// Delivery log: how long a delivery is kept, in seconds.
    #[arg(long = "log-max-age-s", env = "SWITCHYARD_LOG_MAX_AGE_S", value_parser = config::secs, default_value = "86400")]
    pub log_max_age: Duration,
    /// Storage of the router's JetStream assets (delivery log, event streams,
    /// subscription bucket): `file` or `memory`.
    #[arg(long, env = "SWITCHYARD_LOG_STORAGE", value_enum, default_value_t = Storage::File)]
    pub log_storage: Storage,
    /// Replicas of the router's JetStream assets (3 on a NATS cluster).
    #[arg(long, env = "SWITCHYARD_LOG_REPLICAS", default_value_t = 1)]
    pub log_replicas: usize,
    /// Window in which the delivery log stores a redone delivery (same message id) once, in
    /// seconds. Must exceed the lease TTL plus the time to redo an event after a router dies,
    /// and the 30 s after which an unacknowledged event or hand-off is offered again.
    #[arg(long = "log-duplicate-window-s", env = "SWITCHYARD_LOG_DUPLICATE_WINDOW_S", value_parser = config::secs, default_value = "120")]
    pub log_duplicate_window: Duration,
    /// Partitions per event stream (events on one subject stay in one partition).
    #[arg(long, env = "SWITCHYARD_PARTITIONS", default_value_t = 8)]
    pub partitions: u32,
    /// User partitions of the delivery stage (each user's deliveries have one
    /// writer: the router holding the user's partition). Edges must use the same number.
    #[arg(long, env = "SWITCHYARD_USER_PARTITIONS", default_value_t = 8)]
    pub user_partitions: u32,
    /// Log streams the user partitions are spread over (`<BASE>_LOG_<n>`).
    #[arg(long, env = "SWITCHYARD_LOG_STREAMS", default_value_t = 4)]
    pub log_streams: u32,
    /// An edge not heard from for this long is forgotten (its users' presence cleared), in ms.
    #[arg(long = "edge-timeout-ms", env = "SWITCHYARD_EDGE_TIMEOUT_MS", value_parser = config::millis, default_value = "2000")]
    pub edge_timeout: Duration,
    /// How long a router that takes over a user partition waits for the
    /// edges to re-announce their users before it delivers, in ms.
    #[arg(long = "presence-sync-ms", env = "SWITCHYARD_PRESENCE_SYNC_MS", value_parser = config::millis, default_value = "2000")]
    pub presence_sync: Duration,
    /// How long a dead router's partitions wait before another router takes them, in ms.
    #[arg(long = "lease-ttl-ms", env = "SWITCHYARD_LEASE_TTL_MS", value_parser = config::millis, default_value = "5000")]
    pub lease_ttl: Duration,
    /// The longest token lifetime the operator's issuers give (`exp - iat`),
    /// in seconds: a user revocation is kept this long after its `before`.
    #[arg(long = "max-token-lifetime-s", env = "SWITCHYARD_MAX_TOKEN_LIFETIME_S", value_parser = config::secs, default_value = "86400")]
    pub max_token_lifetime: Duration,
    /// How long an application API request waits for every edge (or
    /// router) to answer before it answers `unavailable`, in ms.
    #[arg(long = "api-wait-ms", env = "SWITCHYARD_API_WAIT_MS", value_parser = config::millis, default_value = "2000")]
    pub api_wait: Duration,
    /// How long the latest keyed event of each key is kept for snapshots, in seconds.
    #[arg(long = "snapshot-retention-s", env = "SWITCHYARD_SNAPSHOT_RETENTION_S", value_parser = config::secs, default_value = "86400")]
    pub snapshot_retention: Duration,
    /// Most keys per subscription type whose latest event is kept for
    /// snapshots; events of further keys are not kept (until some expire).
    /// 0 turns snapshots off (nothing is stored; snapshots are empty).
    #[arg(long, env = "SWITCHYARD_SNAPSHOT_MAX_KEYS", default_value_t = 100_000)]
    pub snapshot_max_keys: usize,
    /// Longest an event waits in its stream for a router, in seconds.
    #[arg(long = "events-max-age-s", env = "SWITCHYARD_EVENTS_MAX_AGE_S", value_parser = config::secs, default_value = "86400")]
    pub events_max_age: Duration,
    /// This router's name among routers (default: host name and process id).
    #[arg(long, env = "SWITCHYARD_ROUTER_ID")]
    pub router_id: Option<String>,
    /// Most filter dimensions per subscription (at most 32).
    #[arg(long, env = "SWITCHYARD_MAX_DIMENSIONS", default_value_t = 32)]
    pub max_dimensions: usize,
    /// Most values per filter dimension (at most 1024).
    #[arg(long, env = "SWITCHYARD_MAX_VALUES_PER_DIMENSION", default_value_t = 1024)]
    pub max_values_per_dimension: usize,
    /// Most distinct dimension names the subscriptions of one type may filter
    /// on, all users together (each event scans them); a subscription that
    /// would add more is `invalid_filter`.
    #[arg(long, env = "SWITCHYARD_MAX_TYPE_DIMENSIONS", default_value_t = crate::state::DEFAULT_MAX_TYPE_DIMENSIONS)]
    pub max_type_dimensions: usize,
    /// Rooms anyone may join, comma separated (exact names or `prefix:*`).
    #[arg(long, env = "SWITCHYARD_PUBLIC_ROOMS", value_delimiter = ',', default_value = "")]
    pub public_rooms: Vec<String>,
    /// Subscription types anyone may use, comma separated (`*` all, `prefix*`, exact).
    #[arg(long, env = "SWITCHYARD_PUBLIC_TYPES", value_delimiter = ',', default_value = "*")]
    pub public_types: Vec<String>,
    /// Ask the application (`<prefix>.authz.<kind>`) about joins and types the rules above refuse.
    #[arg(long, env = "SWITCHYARD_AUTHZ_REQUEST", default_value_t = false, action = clap::ArgAction::Set)]
    pub authz_request: bool,
    /// How long to wait for the application's authorization answer, in ms (then deny).
    #[arg(long = "authz-timeout-ms", env = "SWITCHYARD_AUTHZ_TIMEOUT_MS", value_parser = config::millis, default_value = "1000")]
    pub authz_timeout: Duration,
    /// How long an application authorization decision is reused, in seconds.
    #[arg(long = "authz-cache-s", env = "SWITCHYARD_AUTHZ_CACHE_S", value_parser = config::secs, default_value = "60")]
    pub authz_cache: Duration,
    /// Log line format: `text` or `json` (one object per line); the filter is `SWITCHYARD_LOG`.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Prometheus handle supplied by an embedding process (tests); the binary installs its own.
    #[arg(skip)]
    pub metrics: Option<PrometheusHandle>,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The subject prefix is not valid.
    #[error(transparent)]
    Prefix(#[from] switchyard_common::subject::InvalidPrefix),
    /// A numeric setting is out of range.
    #[error("{0}")]
    Range(&'static str),
    /// A setting does not parse.
    #[error("{0}")]
    Invalid(String),
}

impl RouterConfig {
    /// Checks the values that clap cannot.
    pub fn validate(&self) -> Result<Subjects, ConfigError> {
        if self.max_subscriptions == 0 {
            return Err(ConfigError::Range("SWITCHYARD_MAX_SUBSCRIPTIONS must be at least 1"));
        }
        if self.max_rooms_per_user == 0 {
            return Err(ConfigError::Range("SWITCHYARD_MAX_ROOMS_PER_USER must be at least 1"));
        }
        if self.subs_max_bytes < 1 << 20 {
            return Err(ConfigError::Range(
                "SWITCHYARD_SUBS_MAX_BYTES must be at least 1048576 (1 MiB)",
            ));
        }
        if self.subs_tombstone_ttl.is_zero() {
            return Err(ConfigError::Range("SWITCHYARD_SUBS_TOMBSTONE_TTL_S must be at least 1"));
        }
        if self.dedup_window.is_zero() {
            return Err(ConfigError::Range("SWITCHYARD_DEDUP_WINDOW_S must be at least 1"));
        }
        if self.log_max_per_user < 1 || self.log_max_age.is_zero() || !(1..=5).contains(&self.log_replicas) {
            return Err(ConfigError::Range(
                "SWITCHYARD_LOG_MAX_PER_USER and SWITCHYARD_LOG_MAX_AGE_S must be at least 1, SWITCHYARD_LOG_REPLICAS 1 to 5",
            ));
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(ConfigError::Range("SWITCHYARD_PARTITIONS must be 1 to 1024"));
        }
        if !(1..=1024).contains(&self.user_partitions) || !(1..=self.user_partitions).contains(&self.log_streams) {
            return Err(ConfigError::Range(
                "SWITCHYARD_USER_PARTITIONS must be 1 to 1024 and SWITCHYARD_LOG_STREAMS 1 to SWITCHYARD_USER_PARTITIONS",
            ));
        }
        if self.edge_timeout < Duration::from_millis(500) {
            return Err(ConfigError::Range("SWITCHYARD_EDGE_TIMEOUT_MS must be at least 500"));
        }
        if self.lease_ttl < Duration::from_millis(500) {
            return Err(ConfigError::Range("SWITCHYARD_LEASE_TTL_MS must be at least 500"));
        }
        if self.log_duplicate_window.is_zero() || self.events_max_age.is_zero() {
            return Err(ConfigError::Range(
                "SWITCHYARD_LOG_DUPLICATE_WINDOW_S and SWITCHYARD_EVENTS_MAX_AGE_S must be at least 1",
            ));
        }
        if !(1..=switchyard_common::subscription::MAX_FILTER_DIMENSIONS).contains(&self.max_dimensions)
            || !(1..=switchyard_common::subscription::MAX_VALUES_PER_DIMENSION).contains(&self.max_values_per_dimension)
        {
            return Err(ConfigError::Range(
                "SWITCHYARD_MAX_DIMENSIONS must be 1 to 32 and SWITCHYARD_MAX_VALUES_PER_DIMENSION 1 to 1024",
            ));
        }
        if !(1..=4096).contains(&self.max_type_dimensions) {
            return Err(ConfigError::Range("SWITCHYARD_MAX_TYPE_DIMENSIONS must be 1 to 4096"));
        }
        if self.authz_timeout.is_zero() {
            return Err(ConfigError::Range("SWITCHYARD_AUTHZ_TIMEOUT_MS must be at least 1"));
        }
        if let Some(bad) = self
            .public_rooms
            .iter()
            .find(|r| !r.is_empty() && !switchyard_common::ids::is_valid_room(r.trim_end_matches('*')))
        {
            return Err(ConfigError::Invalid(format!(
                "SWITCHYARD_PUBLIC_ROOMS: invalid room pattern {bad:?}"
            )));
        }
        Ok(Subjects::new(&self.nats.prefix)?)
    }

    /// The per-user limits.
    pub fn limits(&self) -> crate::state::Limits {
        crate::state::Limits {
            max_subscriptions: self.max_subscriptions,
            max_dimensions: self.max_dimensions,
            max_values_per_dimension: self.max_values_per_dimension,
            max_rooms: self.max_rooms_per_user,
            max_type_dimensions: self.max_type_dimensions,
        }
    }

    /// The subscription bucket's settings.
    pub fn store_settings(&self) -> crate::store::StoreSettings {
        crate::store::StoreSettings {
            replicas: self.log_replicas,
            storage: self.log_storage,
            max_bytes: self.subs_max_bytes,
            tombstone_ttl: self.subs_tombstone_ttl,
        }
    }

    /// The authorization settings.
    pub fn authz_settings(&self) -> crate::authz::AuthzSettings {
        let clean = |v: &[String]| {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        crate::authz::AuthzSettings {
            public_rooms: clean(&self.public_rooms),
            public_types: clean(&self.public_types),
            ask_application: self.authz_request,
            timeout: self.authz_timeout,
            cache_ttl: self.authz_cache,
        }
    }

    /// The event stream settings.
    pub fn event_settings(&self) -> crate::events::EventSettings {
        crate::events::EventSettings {
            partitions: self.partitions,
            storage: self.log_storage,
            replicas: self.log_replicas,
            max_age: self.events_max_age,
            duplicate_window: self.dedup_window,
        }
    }

    /// This router's id among routers.
    pub fn router_id(&self) -> String {
        self.router_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "router".into());
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{host}-{}-{n}", std::process::id())
        })
    }

    /// The latest-event store's settings (snapshots).
    pub fn latest_settings(&self) -> crate::latest::LatestSettings {
        crate::latest::LatestSettings {
            retention: self.snapshot_retention,
            max_keys_per_type: self.snapshot_max_keys,
            storage: self.log_storage,
            replicas: self.log_replicas,
        }
    }

    /// The delivery log settings.
    pub fn log_settings(&self) -> crate::log::LogSettings {
        crate::log::LogSettings {
            max_per_subject: self.log_max_per_user,
            max_age: self.log_max_age,
            storage: self.log_storage,
            replicas: self.log_replicas,
            duplicate_window: self.log_duplicate_window,
            user_partitions: self.user_partitions,
            groups: self.log_streams,
        }
    }

    /// A config for embedding (tests): defaults, this NATS URL, admin on an ephemeral port.
    pub fn embedded(nats_url: &str) -> RouterConfig {
        let mut c = RouterConfig::parse_from(["switchyard-router"]);
        c.nats.nats_url = nats_url.to_string();
        c.admin_listen = "127.0.0.1:0".parse().expect("literal address");
        c
    }
}
