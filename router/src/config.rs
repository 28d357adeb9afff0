//! Router configuration from flags and `SWITCHYARD_*` environment variables.
//!
//! Parsed and validated once at start; a bad value exits with code 64.

use std::net::SocketAddr;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_common::subject::Subjects;

/// Everything a router needs to run.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard-router",
    version,
    about = "Switchyard router: subscription index and targeted deliveries"
)]
pub struct RouterConfig {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "SWITCHYARD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix shared by producers, routers and edges.
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy")]
    pub prefix: String,
    /// Admin endpoint (health, readiness, metrics).
    #[arg(long, env = "SWITCHYARD_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    pub admin_listen: SocketAddr,
    /// Most subscriptions one user may hold.
    #[arg(long, env = "SWITCHYARD_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,
    /// Window in which events with the same producer `id` are delivered once, in seconds.
    #[arg(long, env = "SWITCHYARD_DEDUP_WINDOW_S", default_value_t = 120)]
    pub dedup_window_s: u64,
    /// Delivery log: messages kept per user (and for broadcasts).
    #[arg(long, env = "SWITCHYARD_LOG_MAX_PER_USER", default_value_t = 1000)]
    pub log_max_per_user: i64,
    /// Delivery log: how long a delivery is kept, in seconds.
    #[arg(long, env = "SWITCHYARD_LOG_MAX_AGE_S", default_value_t = 86_400)]
    pub log_max_age_s: u64,
    /// Delivery log storage: `file` or `memory`.
    #[arg(long, env = "SWITCHYARD_LOG_STORAGE", default_value = "file", value_parser = ["file", "memory"])]
    pub log_storage: String,
    /// Delivery log replicas (3 on a NATS cluster).
    #[arg(long, env = "SWITCHYARD_LOG_REPLICAS", default_value_t = 1)]
    pub log_replicas: usize,
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
}

impl RouterConfig {
    /// Checks the values that clap cannot.
    pub fn validate(&self) -> Result<Subjects, ConfigError> {
        if self.max_subscriptions == 0 {
            return Err(ConfigError::Range("SWITCHYARD_MAX_SUBSCRIPTIONS must be at least 1"));
        }
        if self.dedup_window_s == 0 {
            return Err(ConfigError::Range("SWITCHYARD_DEDUP_WINDOW_S must be at least 1"));
        }
        if self.log_max_per_user < 1 || self.log_max_age_s == 0 || !(1..=5).contains(&self.log_replicas) {
            return Err(ConfigError::Range(
                "SWITCHYARD_LOG_MAX_PER_USER and SWITCHYARD_LOG_MAX_AGE_S must be at least 1, SWITCHYARD_LOG_REPLICAS 1 to 5",
            ));
        }
        Ok(Subjects::new(&self.prefix)?)
    }

    /// The delivery log settings.
    pub fn log_settings(&self) -> crate::log::LogSettings {
        crate::log::LogSettings {
            max_per_subject: self.log_max_per_user,
            max_age: std::time::Duration::from_secs(self.log_max_age_s),
            memory: self.log_storage == "memory",
            replicas: self.log_replicas,
        }
    }

    /// A config for embedding (tests): defaults, this NATS URL, admin on an ephemeral port.
    pub fn embedded(nats_url: &str) -> RouterConfig {
        let mut c = RouterConfig::parse_from(["switchyard-router"]);
        c.nats_url = nats_url.to_string();
        c.admin_listen = "127.0.0.1:0".parse().expect("literal address");
        c
    }
}
