//! Configuration both tiers share: the settings they must agree on
//! ([`NatsArgs`], flattened into each binary's options), and parsers so
//! that a value is parsed once, at start, into its type: durations (the env
//! vars keep their documented units, `_MS` or `_S`, and the code sees a
//! `Duration`).

use std::num::ParseIntError;
use std::time::Duration;

use switchyard_common::secret::Secret;

/// Where a tier finds NATS and the subjects it shares with producers and
/// the other tier.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "SWITCHYARD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix shared by producers, routers and edges.
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy")]
    pub prefix: String,
    /// NATS user, for a server with authorization (with
    /// `SWITCHYARD_NATS_PASSWORD`). A `user:password@` in the URL does the same.
    #[arg(long, env = "SWITCHYARD_NATS_USER")]
    pub nats_user: Option<String>,
    /// The NATS user's password.
    #[arg(long, env = "SWITCHYARD_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret<String>>,
    /// A NATS credentials file (user JWT and NKey seed), for decentralized authorization.
    #[arg(long, env = "SWITCHYARD_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
}

/// A whole number of milliseconds (`SWITCHYARD_*_MS`).
pub fn millis(s: &str) -> Result<Duration, ParseIntError> {
    s.trim().parse().map(Duration::from_millis)
}

/// A whole number of seconds (`SWITCHYARD_*_S`).
pub fn secs(s: &str) -> Result<Duration, ParseIntError> {
    s.trim().parse().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_as_documented() {
        assert_eq!(millis("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(secs("120"), Ok(Duration::from_secs(120)));
        assert!(millis("1.5").is_err());
        assert!(secs("-1").is_err());
    }
}
