//! NATS subject names, all under one configurable prefix.
//!
//! Subjects are the only coupling between producers, routers and edges, so
//! they are built in one place. Callers validate user ids before asking for
//! a per-user subject (see [`crate::ids`]).

use crate::ids;

/// Subject builder for one deployment prefix (default `sy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "sy";

/// The subject token of broadcasts. User ids start with a letter or digit,
/// so no user can own it.
pub const BROADCAST_TOKEN: &str = "_all";

/// Queue group shared by every router, so each event is handled once.
pub const ROUTER_QUEUE_GROUP: &str = "switchyard-routers";

impl Subjects {
    /// A builder for `prefix`; the prefix must be one or more valid subject tokens.
    pub fn new(prefix: &str) -> Result<Subjects, InvalidPrefix> {
        if prefix.split('.').all(ids::is_valid_subject_token) {
            Ok(Subjects {
                prefix: prefix.to_string(),
            })
        } else {
            Err(InvalidPrefix(prefix.to_string()))
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Wildcard routers subscribe to for producer events: `<prefix>.events.>`.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Where a producer publishes an event of `event_type` (optionally keyed).
    pub fn event(&self, event_type: &str, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("{}.events.{event_type}.{k}", self.prefix),
            None => format!("{}.events.{event_type}", self.prefix),
        }
    }

    /// Splits a producer subject into its `<type>` and optional `<key>` tokens.
    /// Returns `None` for subjects outside `<prefix>.events.` or with more tokens.
    pub fn parse_event<'a>(&self, subject: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".events.")?;
        let mut parts = rest.splitn(3, '.');
        let ty = parts.next()?;
        let key = parts.next();
        if parts.next().is_some() {
            return None;
        }
        Some((ty, key))
    }

    /// The durable delivery subject of one user: `<prefix>.deliver.<user>`,
    /// captured by the delivery log.
    pub fn deliver(&self, user: &str) -> String {
        debug_assert!(ids::is_valid_user_id(user));
        format!("{}.deliver.{user}", self.prefix)
    }

    /// Durable broadcasts (`target: all`), stored once: `<prefix>.deliver._all`.
    pub fn deliver_all(&self) -> String {
        format!("{}.deliver.{BROADCAST_TOKEN}", self.prefix)
    }

    /// Every durable delivery subject, for the delivery log stream: `<prefix>.deliver.>`.
    pub fn deliver_wildcard(&self) -> String {
        format!("{}.deliver.>", self.prefix)
    }

    /// The live subject edges subscribe to for one user: `<prefix>.live.<user>`.
    /// Durable deliveries reach it through the log's republish (with their
    /// sequence); non-durable ones are published to it directly.
    pub fn live(&self, user: &str) -> String {
        debug_assert!(ids::is_valid_user_id(user));
        format!("{}.live.{user}", self.prefix)
    }

    /// The live subject of broadcasts, which every edge subscribes to once.
    pub fn live_all(&self) -> String {
        format!("{}.live.{BROADCAST_TOKEN}", self.prefix)
    }

    /// Where the log republishes: `<prefix>.live.>`.
    pub fn live_wildcard(&self) -> String {
        format!("{}.live.>", self.prefix)
    }

    /// Name of the delivery log stream: the prefix, upper-cased, `.` → `_`, plus `_DELIVERIES`.
    pub fn log_stream(&self) -> String {
        format!("{}_DELIVERIES", self.prefix.replace('.', "_").to_ascii_uppercase())
    }

    /// Subscription-change requests from edges to the router tier.
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Application RPC requests for `method`.
    pub fn rpc(&self, method: &str) -> String {
        format!("{}.rpc.{method}", self.prefix)
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

/// A configured prefix that is not a valid sequence of subject tokens.
#[derive(Debug, thiserror::Error)]
#[error("invalid subject prefix {0:?}: tokens must be non-empty and contain no '.', '*', '>' or whitespace")]
pub struct InvalidPrefix(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_prefix() {
        let s = Subjects::new("acme.sy").unwrap();
        assert_eq!(s.events_wildcard(), "acme.sy.events.>");
        assert_eq!(s.deliver("u1"), "acme.sy.deliver.u1");
        assert_eq!(s.deliver_all(), "acme.sy.deliver._all");
        assert_eq!(s.live("u1"), "acme.sy.live.u1");
        assert_eq!(s.live_all(), "acme.sy.live._all");
        assert_eq!(s.log_stream(), "ACME_SY_DELIVERIES");
        assert!(!ids::is_valid_user_id(BROADCAST_TOKEN));
        assert_eq!(s.event("tick", Some("AAPL")), "acme.sy.events.tick.AAPL");
        assert_eq!(s.parse_event("acme.sy.events.tick.AAPL"), Some(("tick", Some("AAPL"))));
        assert_eq!(s.parse_event("acme.sy.events.tick"), Some(("tick", None)));
        assert_eq!(s.parse_event("acme.sy.events.tick.a.b"), None);
        assert_eq!(s.parse_event("other.events.tick"), None);
        assert!(Subjects::new("a b").is_err());
        assert!(Subjects::new("a..b").is_err());
        assert!(Subjects::new("*").is_err());
    }
}
