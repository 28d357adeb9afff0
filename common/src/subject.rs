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

    /// The durable delivery subject of one user in user partition
    /// `partition`: `<prefix>.deliver.<partition>.<user>`, captured by the
    /// log stream of the partition's group. The partition is in the subject
    /// because a stream can capture subjects only by pattern, not by hash.
    pub fn deliver(&self, partition: u32, user: &str) -> String {
        debug_assert!(ids::is_valid_user_id(user));
        format!("{}.deliver.{partition}.{user}", self.prefix)
    }

    /// The durable broadcasts of one user partition, written by that
    /// partition's owner: `<prefix>.deliver.<partition>._all`.
    pub fn deliver_all(&self, partition: u32) -> String {
        format!("{}.deliver.{partition}.{BROADCAST_TOKEN}", self.prefix)
    }

    /// What the log stream of one user partition captures: `<prefix>.deliver.<partition>.*`.
    pub fn deliver_partition(&self, partition: u32) -> String {
        format!("{}.deliver.{partition}.*", self.prefix)
    }

    /// Name of log stream `group`: `<BASE>_LOG_<group>`. User partition `p`
    /// is stored in group `p % groups`.
    pub fn log_stream(&self, group: u32) -> String {
        format!("{}_LOG_{group}", self.asset_base())
    }

    /// The match stage's durable hand-off to user partition `partition`:
    /// `<prefix>.targets.<partition>`, captured by the hand-off stream.
    pub fn targets(&self, partition: u32) -> String {
        format!("{}.targets.{partition}", self.prefix)
    }

    /// What the hand-off stream captures: `<prefix>.targets.*`.
    pub fn targets_wildcard(&self) -> String {
        format!("{}.targets.*", self.prefix)
    }

    /// The hand-off stream: `<BASE>_TARGETS`.
    pub fn targets_stream(&self) -> String {
        format!("{}_TARGETS", self.asset_base())
    }

    /// The match stage's live-only hand-off (core NATS) to user partition
    /// `partition`: `<prefix>.tlive.<partition>`.
    pub fn targets_live(&self, partition: u32) -> String {
        format!("{}.tlive.{partition}", self.prefix)
    }

    /// The one subject an edge takes its live deliveries on: `<prefix>.edge.<edge id>`.
    pub fn edge(&self, edge_id: &str) -> String {
        format!("{}.edge.{edge_id}", self.prefix)
    }

    /// Where edges announce their users to user partition `partition`
    /// (request/reply): `<prefix>.reg.<partition>`.
    pub fn presence_register(&self, partition: u32) -> String {
        format!("{}.reg.{partition}", self.prefix)
    }

    /// Edges say they are alive here (payload: the edge id); routers forget
    /// the users of an edge that stops.
    pub fn edges_heartbeat(&self) -> String {
        format!("{}.edges.heartbeat", self.prefix)
    }

    /// An edge that stops cleanly says so here (payload: the edge id).
    pub fn edges_bye(&self) -> String {
        format!("{}.edges.bye", self.prefix)
    }

    /// Base of the JetStream asset names: the prefix upper-cased, `.` → `_`.
    fn asset_base(&self) -> String {
        self.prefix.replace('.', "_").to_ascii_uppercase()
    }

    /// The event stream of one subject shape: `<BASE>_EVENTS_KEYED` captures
    /// `<prefix>.events.<type>.<key>`, `<BASE>_EVENTS_TYPED` captures
    /// `<prefix>.events.<type>`. One stream per shape because a stream has
    /// one subject transform, and partitioning needs `*` tokens to hash.
    pub fn events_stream(&self, shape: EventShape) -> String {
        match shape {
            EventShape::Keyed => format!("{}_EVENTS_KEYED", self.asset_base()),
            EventShape::Typed => format!("{}_EVENTS_TYPED", self.asset_base()),
        }
    }

    /// What producers publish to, for one shape: `<prefix>.events.*.*` or `<prefix>.events.*`.
    pub fn events_capture(&self, shape: EventShape) -> String {
        match shape {
            EventShape::Keyed => format!("{}.events.*.*", self.prefix),
            EventShape::Typed => format!("{}.events.*", self.prefix),
        }
    }

    /// Producer subjects with more tokens than any valid shape (counted as malformed).
    pub fn events_too_deep(&self) -> String {
        format!("{}.events.*.*.>", self.prefix)
    }

    /// The stream's subject transform destination: the partition number
    /// (a hash of the type and key tokens) after a per-shape token, then
    /// the original tokens, e.g. `sy.evk.3.tick.AAPL` or `sy.evt.5.alert`.
    pub fn events_partitioned(&self, shape: EventShape, partitions: u32) -> String {
        match shape {
            EventShape::Keyed => format!(
                "{}.evk.{{{{partition({partitions},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
                self.prefix
            ),
            EventShape::Typed => format!(
                "{}.evt.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
                self.prefix
            ),
        }
    }

    /// The stored subjects of one partition: `<prefix>.evk.<p>.>` or `<prefix>.evt.<p>.>`.
    pub fn events_partition_filter(&self, shape: EventShape, partition: u32) -> String {
        match shape {
            EventShape::Keyed => format!("{}.evk.{partition}.>", self.prefix),
            EventShape::Typed => format!("{}.evt.{partition}.>", self.prefix),
        }
    }

    /// Splits a stored (partitioned) event subject into `<type>` and optional `<key>`.
    pub fn parse_partitioned_event<'a>(&self, subject: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        let (shape, rest) = rest.split_once('.')?;
        let (_partition, rest) = rest.split_once('.')?;
        match (shape, rest.split_once('.')) {
            ("evk", Some((ty, key))) if !key.contains('.') => Some((ty, Some(key))),
            ("evt", None) => Some((rest, None)),
            _ => None,
        }
    }

    /// The key-value bucket holding subscriptions and room memberships.
    pub fn store_bucket(&self) -> String {
        format!("{}_SUBS", self.asset_base())
    }

    /// The key-value bucket holding routers' partition leases.
    pub fn lease_bucket(&self) -> String {
        format!("{}_LEASES", self.asset_base())
    }

    /// Routers announce themselves here so each knows how many share the partitions.
    pub fn router_heartbeat(&self) -> String {
        format!("{}.routers.heartbeat", self.prefix)
    }

    /// Where the router asks the application whether `kind` (`join`, `subscribe`) is allowed.
    pub fn authz(&self, kind: &str) -> String {
        format!("{}.authz.{kind}", self.prefix)
    }

    /// Subscription-change requests from edges to the router tier.
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Application API requests for `method` (docs/PROTOCOL.md, "Application API").
    pub fn api(&self, method: &str) -> String {
        format!("{}.api.{method}", self.prefix)
    }

    /// Every application API method (the routers' queue subscription).
    pub fn api_wildcard(&self) -> String {
        format!("{}.api.*", self.prefix)
    }

    /// Commands every edge answers (the fleet-wide half of the API).
    pub fn edges_command(&self) -> String {
        format!("{}.edges.command", self.prefix)
    }

    /// Questions every router answers (the delivery stage's presence counts).
    pub fn routers_command(&self) -> String {
        format!("{}.routers.command", self.prefix)
    }

    /// Presence events: a user's first connection opened (`online`) or last closed.
    pub fn presence_event(&self, online: bool) -> String {
        format!("{}.presence.{}", self.prefix, if online { "online" } else { "offline" })
    }

    /// The stream keeping the latest keyed event of each (type, key) for snapshots.
    pub fn latest_stream(&self) -> String {
        format!("{}_LATEST", self.asset_base())
    }

    /// The latest-event subject of subscription type `sub_type` (an
    /// event's target type) and key token `token` (see `crate::latest::key_token`).
    pub fn latest(&self, sub_type: &str, token: &str) -> String {
        format!("{}.latest.{sub_type}.{token}", self.prefix)
    }

    /// Every latest-event subject.
    pub fn latest_wildcard(&self) -> String {
        format!("{}.latest.>", self.prefix)
    }

    /// The key-value bucket holding token revocations.
    pub fn revocation_bucket(&self) -> String {
        format!("{}_REVOKED", self.asset_base())
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

/// The two subject shapes producers publish on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventShape {
    /// `<prefix>.events.<type>.<key>`: partitioned by type and key.
    Keyed,
    /// `<prefix>.events.<type>`: partitioned by type.
    Typed,
}

impl EventShape {
    /// Both shapes.
    pub const ALL: [EventShape; 2] = [EventShape::Keyed, EventShape::Typed];

    /// A short tag for names (`k`, `t`).
    pub fn tag(self) -> &'static str {
        match self {
            EventShape::Keyed => "k",
            EventShape::Typed => "t",
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
        assert_eq!(s.deliver(3, "u1"), "acme.sy.deliver.3.u1");
        assert_eq!(s.deliver_all(3), "acme.sy.deliver.3._all");
        assert_eq!(s.deliver_partition(3), "acme.sy.deliver.3.*");
        assert_eq!(s.log_stream(1), "ACME_SY_LOG_1");
        assert_eq!(s.targets(2), "acme.sy.targets.2");
        assert_eq!(s.targets_stream(), "ACME_SY_TARGETS");
        assert_eq!(s.edge("e1f"), "acme.sy.edge.e1f");
        assert!(!ids::is_valid_user_id(BROADCAST_TOKEN));
        assert_eq!(s.event("tick", Some("AAPL")), "acme.sy.events.tick.AAPL");
        assert_eq!(s.parse_event("acme.sy.events.tick.AAPL"), Some(("tick", Some("AAPL"))));
        assert_eq!(s.parse_event("acme.sy.events.tick"), Some(("tick", None)));
        assert_eq!(s.parse_event("acme.sy.events.tick.a.b"), None);
        assert_eq!(s.parse_event("other.events.tick"), None);
        assert_eq!(s.events_stream(EventShape::Keyed), "ACME_SY_EVENTS_KEYED");
        assert_eq!(
            s.events_partitioned(EventShape::Keyed, 8),
            "acme.sy.evk.{{partition(8,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}"
        );
        assert_eq!(
            s.events_partitioned(EventShape::Typed, 4),
            "acme.sy.evt.{{partition(4,1)}}.{{wildcard(1)}}"
        );
        assert_eq!(s.events_partition_filter(EventShape::Typed, 3), "acme.sy.evt.3.>");
        assert_eq!(
            s.parse_partitioned_event("acme.sy.evk.3.tick.AAPL"),
            Some(("tick", Some("AAPL")))
        );
        assert_eq!(s.parse_partitioned_event("acme.sy.evt.0.alert"), Some(("alert", None)));
        assert_eq!(s.parse_partitioned_event("acme.sy.evt.0.alert.x"), None);
        assert_eq!(s.parse_partitioned_event("acme.sy.evk.0.alert"), None);
        assert_eq!(s.parse_partitioned_event("acme.sy.evk.0.a.b.c"), None);
        assert_eq!(s.store_bucket(), "ACME_SY_SUBS");
        assert!(Subjects::new("a b").is_err());
        assert!(Subjects::new("a..b").is_err());
        assert!(Subjects::new("*").is_err());
    }
}
