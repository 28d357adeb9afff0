//! Edge configuration from flags and `SWITCHYARD_*` environment variables.
//!
//! Parsed and validated once at start; a bad value exits with code 64.
//! `Debug` is derived, so the configuration printed at start shows every
//! field; secrets are [`Secret`]s, whose `Debug` is `<redacted>`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_common::client::Limits;
use switchyard_common::secret::Secret;
use switchyard_common::subject::Subjects;
use switchyard_runtime::config;
use switchyard_runtime::logging::LogFormat;

/// The secret a dev-mode edge uses when no key is configured. Never use it in production.
pub const DEV_JWT_SECRET: &str = "switchyard-dev-secret-do-not-use-in-production";

/// Everything an edge needs to run.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard-edge",
    version,
    about = "Switchyard edge: WebSocket termination and per-connection delivery"
)]
pub struct EdgeConfig {
    /// NATS and the subject prefix (shared with the other tier).
    #[command(flatten)]
    pub nats: switchyard_runtime::config::NatsArgs,
    /// WebSocket listen address.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin endpoint (health, readiness, metrics).
    #[arg(long, env = "SWITCHYARD_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// HMAC secret for HS256/384/512 tokens.
    #[arg(long, env = "SWITCHYARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret<String>>,
    /// PEM public key (RSA or EC P-256) for RS256/ES256 tokens.
    #[arg(long, env = "SWITCHYARD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// JWKS file (keys chosen by `kid`; re-read when it changes) for RS256/ES256 tokens.
    #[arg(long, env = "SWITCHYARD_JWKS")]
    pub jwks: Option<std::path::PathBuf>,
    /// Verified tokens kept in memory (never past their `exp`); 0 turns the cache off.
    #[arg(long, env = "SWITCHYARD_JWT_CACHE_CAPACITY", default_value_t = 100_000)]
    pub jwt_cache_capacity: u64,
    /// Required `iss` claim, when set.
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds.
    #[arg(long, env = "SWITCHYARD_JWT_LEEWAY_S", default_value_t = 0)]
    pub jwt_leeway_s: u64,
    /// Dev mode: without a configured key, accept tokens signed with the built-in dev secret.
    #[arg(long, env = "SWITCHYARD_DEV_INSECURE", default_value_t = false)]
    pub dev_insecure: bool,
    /// Accept `?token=` in the upgrade URL (tokens in URLs end up in logs).
    #[arg(long, env = "SWITCHYARD_ALLOW_QUERY_TOKEN", default_value_t = false)]
    pub allow_query_token: bool,
    /// Time a frame-auth client has to send its `auth` frame, in milliseconds.
    #[arg(long = "auth-timeout-ms", env = "SWITCHYARD_AUTH_TIMEOUT_MS", value_parser = config::millis, default_value = "5000")]
    pub auth_timeout: Duration,
    /// WebSocket ping interval, in milliseconds; silence for two intervals closes with 4000.
    #[arg(long = "heartbeat-ms", env = "SWITCHYARD_HEARTBEAT_MS", value_parser = config::millis, default_value = "25000")]
    pub heartbeat: Duration,
    /// Largest client frame, in bytes; larger closes with 4008.
    #[arg(long, env = "SWITCHYARD_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Most subscriptions per user (announced in `ready`; enforced by the router's own setting).
    #[arg(long, env = "SWITCHYARD_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: u64,
    /// Sustained events per second per connection (announced in `ready`).
    #[arg(long, env = "SWITCHYARD_RATE_PER_S", default_value_t = 100)]
    pub rate_per_s: u64,
    /// Token-bucket burst per connection (announced in `ready`).
    #[arg(long, env = "SWITCHYARD_BURST", default_value_t = 200)]
    pub burst: u64,
    /// Most events in one `batch` frame.
    #[arg(long, env = "SWITCHYARD_BATCH_MAX_EVENTS", default_value_t = 50)]
    pub batch_max_events: usize,
    /// Largest `batch` frame, in bytes (an event larger than this goes alone).
    #[arg(long, env = "SWITCHYARD_BATCH_MAX_BYTES", default_value_t = 65_536)]
    pub batch_max_bytes: usize,
    /// Outbound queue per connection, in events; beyond it events are dropped and reported.
    #[arg(long, env = "SWITCHYARD_QUEUE_EVENTS", default_value_t = 1024)]
    pub queue_events: usize,
    /// Outbound queue per connection, in bytes of event bodies.
    #[arg(long, env = "SWITCHYARD_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub queue_bytes: usize,
    /// A connection whose queue stays full this long is closed with 4009, in milliseconds.
    #[arg(long = "slow-consumer-ms", env = "SWITCHYARD_SLOW_CONSUMER_MS", value_parser = config::millis, default_value = "10000")]
    pub slow_consumer: Duration,
    /// A socket write blocked this long drops the connection (a client that stopped reading entirely), in milliseconds.
    #[arg(long = "write-stall-ms", env = "SWITCHYARD_WRITE_STALL_MS", value_parser = config::millis, default_value = "30000")]
    pub write_stall: Duration,
    /// Optional wait after an event arrives for more to batch with it, in milliseconds (0: none).
    #[arg(long = "linger-ms", env = "SWITCHYARD_LINGER_MS", value_parser = config::millis, default_value = "0")]
    pub linger: Duration,
    /// Sustained client ops per second per connection, `ping` and `auth` aside
    /// (more get `error rate_limited`); 0 turns the limit off.
    #[arg(long, env = "SWITCHYARD_OPS_PER_S", default_value_t = 20)]
    pub ops_per_s: u32,
    /// Client ops a rested connection may send at once (0 counts as 1).
    #[arg(long, env = "SWITCHYARD_OPS_BURST", default_value_t = 50)]
    pub ops_burst: u32,
    /// Bad frames allowed per 60 s before closing with 4008.
    #[arg(long, env = "SWITCHYARD_BAD_FRAME_BUDGET", default_value_t = 20)]
    pub bad_frame_budget: u32,
    /// Time the router tier (and rpc applications) have to answer, in milliseconds.
    #[arg(long = "request-timeout-ms", env = "SWITCHYARD_REQUEST_TIMEOUT_MS", value_parser = config::millis, default_value = "5000")]
    pub request_timeout: Duration,
    /// How long a new connection waits for its user's delivery partition to
    /// acknowledge it (covers a router failover: lease TTL plus presence sync), in milliseconds.
    #[arg(long = "register-timeout-ms", env = "SWITCHYARD_REGISTER_TIMEOUT_MS", value_parser = config::millis, default_value = "10000")]
    pub register_timeout: Duration,
    /// User partitions of the router tier's delivery stage; must equal the routers' setting.
    #[arg(long, env = "SWITCHYARD_USER_PARTITIONS", default_value_t = 8)]
    pub user_partitions: u32,
    /// How long to wait at start for the delivery log stream (created by routers), in milliseconds.
    #[arg(long = "log-wait-ms", env = "SWITCHYARD_LOG_WAIT_MS", value_parser = config::millis, default_value = "30000")]
    pub log_wait: Duration,
    /// PEM certificate chain for WSS (TLS at the edge); with `tls_key`.
    #[arg(long, env = "SWITCHYARD_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for WSS; with `tls_cert`.
    #[arg(long, env = "SWITCHYARD_TLS_KEY")]
    pub tls_key: Option<Secret<std::path::PathBuf>>,
    /// Most WebSocket connections on this node; more get HTTP 503.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 200_000)]
    pub max_connections: usize,
    /// Time a connection has for its TLS handshake, and then for each HTTP
    /// request head (the upgrade request included); an HTTP connection idle
    /// this long between requests is closed too. In milliseconds.
    #[arg(long = "handshake-timeout-ms", env = "SWITCHYARD_HANDSHAKE_TIMEOUT_MS", value_parser = config::millis, default_value = "10000")]
    pub handshake_timeout: Duration,
    /// Most connections from one source address (IPv6: one /64) that are not
    /// yet upgraded to WebSocket; more are closed at accept. 0: no cap.
    #[arg(long, env = "SWITCHYARD_MAX_PENDING_PER_ADDR", default_value_t = 256)]
    pub max_pending_per_addr: usize,
    /// Most connections of one user on this node; more get HTTP 429 (header auth) or close 4008 (frame auth).
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    pub max_connections_per_user: u32,
    /// Browser origins allowed to connect, comma separated (empty: any). Requests without `Origin` (native clients) pass.
    #[arg(long, env = "SWITCHYARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// On SIGTERM, reconnect delays announced to clients are spread over this window, in milliseconds.
    #[arg(long = "drain-spread-ms", env = "SWITCHYARD_DRAIN_SPREAD_MS", value_parser = config::millis, default_value = "10000")]
    pub drain_spread: Duration,
    /// On SIGTERM, the process exits when its connections are gone or after this long, in milliseconds.
    #[arg(long = "drain-timeout-ms", env = "SWITCHYARD_DRAIN_TIMEOUT_MS", value_parser = config::millis, default_value = "30000")]
    pub drain_timeout: Duration,
    /// Directory served as the demo page at `/demo/` on the WebSocket port (unset: off, 404).
    /// With `--dev-insecure` and no key, `/demo/token` also mints short-lived dev tokens.
    #[arg(long, env = "SWITCHYARD_DEMO_DIR")]
    pub demo_dir: Option<std::path::PathBuf>,
    /// Log line format: `text` or `json` (one object per line); the filter is `SWITCHYARD_LOG`.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// permessage-deflate (`SWITCHYARD_DEFLATE*`).
    #[command(flatten)]
    pub deflate: crate::deflate::DeflateSettings,
    /// Prometheus handle supplied by an embedding process (tests); the binary installs its own.
    #[arg(skip)]
    pub metrics: Option<PrometheusHandle>,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No key and no dev mode.
    #[error("no JWT key configured: set SWITCHYARD_JWT_SECRET, SWITCHYARD_JWT_PUBLIC_KEY or SWITCHYARD_JWKS, or pass --dev-insecure (SWITCHYARD_DEV_INSECURE=true) for local development only")]
    NoKey,
    /// Dev mode would verify with the public dev secret on a listener
    /// other clients can reach.
    #[error("--dev-insecure without a JWT key accepts tokens anyone can sign (and, with SWITCHYARD_DEMO_DIR, mints them for anyone), so it is allowed only with the WebSocket listener on a loopback address (SWITCHYARD_LISTEN=127.0.0.1:PORT or [::1]:PORT), not {0}; configure SWITCHYARD_JWT_SECRET, SWITCHYARD_JWT_PUBLIC_KEY or SWITCHYARD_JWKS instead")]
    DevModeNotLoopback(SocketAddr),
    /// The subject prefix is not valid.
    #[error(transparent)]
    Prefix(#[from] switchyard_common::subject::InvalidPrefix),
    /// A numeric setting is out of range.
    #[error("{0}")]
    Range(&'static str),
    /// A permessage-deflate setting is out of range.
    #[error(transparent)]
    Deflate(#[from] crate::deflate::settings::DeflateSettingsError),
    /// The demo page is configured but not built in.
    #[error("SWITCHYARD_DEMO_DIR is set, but this edge was built without the demo page (cargo feature `demo`)")]
    DemoNotBuilt,
}

impl EdgeConfig {
    /// Checks what clap cannot; returns the subject builder.
    pub fn validate(&self) -> Result<Subjects, ConfigError> {
        if !self.has_key() && !self.dev_insecure {
            return Err(ConfigError::NoKey);
        }
        if self.dev_insecure && !self.has_key() && !self.listen.ip().is_loopback() {
            return Err(ConfigError::DevModeNotLoopback(self.listen));
        }
        if self.heartbeat < Duration::from_millis(100) {
            return Err(ConfigError::Range("SWITCHYARD_HEARTBEAT_MS must be at least 100"));
        }
        if self.max_frame_bytes < 256 {
            return Err(ConfigError::Range("SWITCHYARD_MAX_FRAME_BYTES must be at least 256"));
        }
        if self.batch_max_events == 0 || self.queue_events == 0 || self.batch_max_bytes == 0 {
            return Err(ConfigError::Range("batch and queue sizes must be at least 1"));
        }
        if cfg!(not(feature = "demo")) && self.demo_dir.is_some() {
            return Err(ConfigError::DemoNotBuilt);
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Range(
                "SWITCHYARD_TLS_CERT and SWITCHYARD_TLS_KEY go together",
            ));
        }
        if !(1..=1024).contains(&self.user_partitions) {
            return Err(ConfigError::Range("SWITCHYARD_USER_PARTITIONS must be 1 to 1024"));
        }
        if self.max_connections == 0 || self.max_connections_per_user == 0 {
            return Err(ConfigError::Range("connection limits must be at least 1"));
        }
        if self.handshake_timeout < Duration::from_millis(10) {
            return Err(ConfigError::Range(
                "SWITCHYARD_HANDSHAKE_TIMEOUT_MS must be at least 10",
            ));
        }
        self.deflate.validate()?;
        Ok(Subjects::new(&self.nats.prefix)?)
    }

    /// Whether any verification key is configured.
    pub fn has_key(&self) -> bool {
        self.jwt_secret.as_ref().is_some_and(|s| !s.expose().is_empty())
            || self.jwt_public_key.is_some()
            || self.jwks.is_some()
    }

    /// The HMAC secret tokens are verified with: the configured one, or the
    /// dev secret in dev mode when no key at all is configured (never beside
    /// a public key, so a public-key edge cannot be fooled with the dev secret).
    pub fn hmac_secret(&self) -> Option<&str> {
        match self.jwt_secret.as_ref().map(|s| s.expose().as_str()) {
            Some(s) if !s.is_empty() => Some(s),
            _ if self.dev_insecure && !self.has_key() => Some(DEV_JWT_SECRET),
            _ => None,
        }
    }

    /// Whether `/demo/token` mints dev tokens: only with the demo enabled on a
    /// dev-mode edge that has no key, i.e. one that verifies with the dev secret.
    pub fn dev_tokens_enabled(&self) -> bool {
        self.demo_dir.is_some() && self.dev_insecure && !self.has_key()
    }

    /// Token verification settings.
    pub fn auth_settings(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            secret: self.hmac_secret().map(str::to_string),
            public_key_pem: self.jwt_public_key.clone(),
            jwks: self.jwks.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway_s: self.jwt_leeway_s,
            cache_capacity: self.jwt_cache_capacity,
        }
    }

    /// The limits announced in `ready`.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes as u64,
            max_subscriptions: self.max_subscriptions,
            rate_per_s: self.rate_per_s,
            burst: self.burst,
            batch_max_events: self.batch_max_events as u64,
            batch_max_bytes: self.batch_max_bytes as u64,
        }
    }

    /// The flow-control settings of each connection's outbound queue.
    pub fn outbound(&self) -> crate::outbound::OutboundConfig {
        crate::outbound::OutboundConfig {
            max_events: self.queue_events,
            max_bytes: self.queue_bytes,
            batch_max_events: self.batch_max_events,
            batch_max_bytes: self.batch_max_bytes,
            rate_per_s: u32::try_from(self.rate_per_s).unwrap_or(u32::MAX),
            burst: u32::try_from(self.burst).unwrap_or(u32::MAX),
        }
    }

    /// A fresh op rate limiter for one connection.
    pub fn op_limiter(&self) -> crate::op_limit::OpLimiter {
        crate::op_limit::OpLimiter::new(self.ops_per_s, self.ops_burst)
    }

    /// A config for embedding (tests): defaults, this NATS URL and secret, ports ephemeral.
    pub fn embedded(nats_url: &str, secret: &str) -> EdgeConfig {
        let mut c = EdgeConfig::parse_from(["switchyard-edge"]);
        c.nats.nats_url = nats_url.to_string();
        c.jwt_secret = Some(secret.into());
        c.listen = "127.0.0.1:0".parse().expect("literal address");
        c.admin_listen = "127.0.0.1:0".parse().expect("literal address");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_start_without_a_key_unless_dev_mode() {
        let mut c = EdgeConfig::parse_from(["switchyard-edge", "--listen", "127.0.0.1:8080"]);
        c.jwt_secret = None;
        assert!(matches!(c.validate(), Err(ConfigError::NoKey)));
        c.jwt_secret = Some("".into());
        assert!(matches!(c.validate(), Err(ConfigError::NoKey)));
        c.dev_insecure = true;
        assert!(c.validate().is_ok());
        assert_eq!(c.hmac_secret(), Some(DEV_JWT_SECRET));
        c.jwt_public_key = Some("/keys/pub.pem".into());
        assert_eq!(c.hmac_secret(), None, "the dev secret must not sit beside a public key");
        assert!(c.validate().is_ok());
        c.dev_insecure = false;
        assert!(c.validate().is_ok());
        c.jwt_secret = Some("k".into());
        assert_eq!(c.hmac_secret(), Some("k"));
        assert!(!format!("{c:?}").contains("\"k\""), "secret leaked into Debug output");
    }

    #[test]
    fn dev_tokens_only_with_the_demo_in_dev_mode_without_a_key() {
        let mut c = EdgeConfig::parse_from(["switchyard-edge", "--dev-insecure"]);
        assert!(!c.dev_tokens_enabled(), "demo off");
        c.demo_dir = Some("/srv/demo".into());
        assert!(c.dev_tokens_enabled());
        c.jwt_secret = Some("real".into());
        assert!(!c.dev_tokens_enabled(), "a configured key turns dev tokens off");
        c.jwt_secret = None;
        c.dev_insecure = false;
        assert!(!c.dev_tokens_enabled());
    }

    #[test]
    fn dev_mode_only_on_a_loopback_listener() {
        let mut c = EdgeConfig::parse_from(["switchyard-edge", "--dev-insecure"]);
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080", "the default listens everywhere");
        assert!(matches!(c.validate(), Err(ConfigError::DevModeNotLoopback(_))));
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        for refused in ["[::]:8080", "10.0.0.7:8080", "192.168.1.2:8080", "[2001:db8::1]:8080"] {
            c.listen = refused.parse().unwrap();
            assert!(
                matches!(c.validate(), Err(ConfigError::DevModeNotLoopback(a)) if a == c.listen),
                "{refused}"
            );
        }
        for allowed in ["127.0.0.1:8080", "127.0.0.2:0", "[::1]:8080"] {
            c.listen = allowed.parse().unwrap();
            assert!(c.validate().is_ok(), "{allowed}");
        }
        // With a key configured the dev secret is not in use: any address.
        c.listen = "0.0.0.0:8080".parse().unwrap();
        c.jwt_secret = Some("real".into());
        assert!(c.validate().is_ok());
        c.jwt_secret = None;
        c.jwks = Some("/keys/jwks.json".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn pre_upgrade_limits_have_flags_and_bounds() {
        let c = EdgeConfig::parse_from([
            "switchyard-edge",
            "--jwt-secret",
            "s",
            "--handshake-timeout-ms",
            "300",
            "--max-pending-per-addr",
            "0",
        ]);
        assert_eq!(c.handshake_timeout, Duration::from_millis(300));
        assert_eq!(c.max_pending_per_addr, 0);
        assert!(c.validate().is_ok());
        let d = EdgeConfig::parse_from(["switchyard-edge", "--jwt-secret", "s"]);
        assert_eq!(
            (d.handshake_timeout, d.max_pending_per_addr),
            (Duration::from_secs(10), 256)
        );
        let bad = EdgeConfig::parse_from(["switchyard-edge", "--jwt-secret", "s", "--handshake-timeout-ms", "0"]);
        assert!(matches!(bad.validate(), Err(ConfigError::Range(_))));
    }

    #[test]
    fn flags_and_env_names() {
        let c = EdgeConfig::parse_from([
            "switchyard-edge",
            "--jwt-secret",
            "s",
            "--prefix",
            "acme",
            "--listen",
            "127.0.0.1:1",
        ]);
        assert_eq!(c.validate().unwrap().prefix(), "acme");
        let bad = EdgeConfig::parse_from(["switchyard-edge", "--jwt-secret", "s", "--prefix", "a b"]);
        assert!(matches!(bad.validate(), Err(ConfigError::Prefix(_))));
    }
}
