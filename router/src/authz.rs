//! Authorization of joins and subscription types.
//!
//! A request is allowed, in this order, by the token's `rooms` claim (joins
//! only), by the operator's public rooms or public subscription types, or,
//! when the operator turns it on, by the application answering a NATS
//! request on `<prefix>.authz.<kind>`. No answer in time, no responder or
//! an undecodable answer means deny: a broken hook must never open access.
//!
//! The application's decisions are cached (bounded, with a TTL) by kind,
//! user, roles and target (the room, or the subscription type), so a user
//! re-subscribing on every page load costs one request per TTL.
//!
//! Wire format (MessagePack maps): request `{"kind","user","roles","rooms",
//! "room"}` for `join`, `{"kind","user","roles","rooms","type","filters"}` for
//! `subscribe`; reply `{"allow":bool,"message"?:string}`.

use std::time::Duration;

use rmpv::Value;
use switchyard_common::ids;
use switchyard_common::subject::Subjects;
use switchyard_common::subscription::Subscription;

/// Operator settings for authorization.
#[derive(Debug, Clone)]
pub struct AuthzSettings {
    /// Rooms anyone may join (exact names or `prefix:*`).
    pub public_rooms: Vec<String>,
    /// Subscription types anyone may use: exact names, `prefix*`, or `*` for all.
    pub public_types: Vec<String>,
    /// Whether to ask the application about what the rules above do not allow.
    pub ask_application: bool,
    /// How long to wait for the application.
    pub timeout: Duration,
    /// How long an application decision is reused.
    pub cache_ttl: Duration,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse, with the reason shown to the client.
    Deny(String),
}

/// Who is asking: the verified claims the edge passed on.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The user id.
    pub user: &'a str,
    /// The token's `roles`.
    pub roles: &'a [String],
    /// The token's `rooms`.
    pub rooms: &'a [String],
}

type CacheKey = (&'static str, String, Vec<String>, String);

/// The authorization policy of one router.
pub struct Authz {
    settings: AuthzSettings,
    client: async_nats::Client,
    subjects: Subjects,
    cache: moka::sync::Cache<CacheKey, Decision>,
}

/// Whether `pattern` (exact, `prefix*`, or `*`) admits `sub_type`.
pub fn type_pattern_allows(pattern: &str, sub_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => sub_type.starts_with(prefix),
        None => pattern == sub_type,
    }
}

impl Authz {
    /// A policy asking the application through `client` when configured.
    pub fn new(settings: AuthzSettings, client: async_nats::Client, subjects: Subjects) -> Authz {
        let cache = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(settings.cache_ttl.max(Duration::from_millis(1)))
            .build();
        Authz {
            settings,
            client,
            subjects,
            cache,
        }
    }

    /// May `caller` join `room`?
    pub async fn join(&self, caller: Caller<'_>, room: &str) -> Decision {
        if ids::room_allowed(caller.rooms, room) || ids::room_allowed(&self.settings.public_rooms, room) {
            return Decision::Allow;
        }
        let request = || {
            vec![
                (Value::from("room"), Value::from(room)),
                (Value::from("kind"), Value::from("join")),
            ]
        };
        self.ask("join", caller, room, request, format!("not allowed to join {room:?}"))
            .await
    }

    /// May `caller` hold a subscription like `sub` (decided by its type)?
    pub async fn subscribe(&self, caller: Caller<'_>, sub: &Subscription) -> Decision {
        let ty = sub.sub_type.as_str();
        if self.settings.public_types.iter().any(|p| type_pattern_allows(p, ty)) {
            return Decision::Allow;
        }
        let request = || {
            let filters = sub
                .filters
                .iter()
                .map(|(k, vs)| {
                    (
                        Value::from(k.as_str()),
                        Value::Array(vs.iter().map(|v| Value::from(v.as_str())).collect()),
                    )
                })
                .collect();
            vec![
                (Value::from("type"), Value::from(ty)),
                (Value::from("filters"), Value::Map(filters)),
                (Value::from("kind"), Value::from("subscribe")),
            ]
        };
        self.ask(
            "subscribe",
            caller,
            ty,
            request,
            format!("not allowed to subscribe to type {ty:?}"),
        )
        .await
    }

    async fn ask(
        &self,
        kind: &'static str,
        caller: Caller<'_>,
        target: &str,
        request: impl FnOnce() -> Vec<(Value, Value)>,
        denial: String,
    ) -> Decision {
        if !self.settings.ask_application {
            return Decision::Deny(denial);
        }
        let key: CacheKey = (kind, caller.user.to_string(), caller.roles.to_vec(), target.to_string());
        if let Some(d) = self.cache.get(&key) {
            return d;
        }
        let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::from(s.as_str())).collect());
        let mut map = vec![
            (Value::from("user"), Value::from(caller.user)),
            (Value::from("roles"), strings(caller.roles)),
            (Value::from("rooms"), strings(caller.rooms)),
        ];
        map.extend(request());
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &Value::Map(map)).expect("writing to a Vec");
        let subject = self.subjects.authz(kind);
        let answer = tokio::time::timeout(self.settings.timeout, self.client.request(subject, payload.into())).await;
        let decision = match answer {
            Ok(Ok(msg)) => match parse_reply(&msg.payload) {
                Some(d) => d,
                None => {
                    metrics::counter!("switchyard_router_authz_total", "kind" => kind, "result" => "bad_reply")
                        .increment(1);
                    tracing::warn!(kind, "undecodable authorization reply; denied");
                    return Decision::Deny(denial);
                }
            },
            Ok(Err(e)) => {
                metrics::counter!("switchyard_router_authz_total", "kind" => kind, "result" => "no_answer")
                    .increment(1);
                tracing::debug!(kind, error = %e, "authorization request failed; denied");
                return Decision::Deny(denial);
            }
            Err(_) => {
                metrics::counter!("switchyard_router_authz_total", "kind" => kind, "result" => "timeout").increment(1);
                return Decision::Deny(denial);
            }
        };
        let result = if decision == Decision::Allow { "allow" } else { "deny" };
        metrics::counter!("switchyard_router_authz_total", "kind" => kind, "result" => result).increment(1);
        let decision = match decision {
            Decision::Deny(m) if m.is_empty() => Decision::Deny(denial),
            d => d,
        };
        self.cache.insert(key, decision.clone());
        decision
    }
}

/// Reads `{"allow":bool,"message"?:string}`.
fn parse_reply(buf: &[u8]) -> Option<Decision> {
    let v = rmpv::decode::read_value(&mut &buf[..]).ok()?;
    let map = v.as_map()?;
    let allow = switchyard_common::value::get(map, "allow")?.as_bool()?;
    if allow {
        return Some(Decision::Allow);
    }
    let message = switchyard_common::value::get(map, "message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Some(Decision::Deny(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        assert!(type_pattern_allows("*", "tick"));
        assert!(type_pattern_allows("tick", "tick"));
        assert!(!type_pattern_allows("tick", "ticks"));
        assert!(type_pattern_allows("market_*", "market_depth"));
        assert!(!type_pattern_allows("market_*", "alerts"));
    }

    #[test]
    fn replies() {
        let enc = |v: Value| {
            let mut b = Vec::new();
            rmpv::encode::write_value(&mut b, &v).unwrap();
            b
        };
        assert_eq!(
            parse_reply(&enc(Value::Map(vec![(Value::from("allow"), Value::from(true))]))),
            Some(Decision::Allow)
        );
        assert_eq!(
            parse_reply(&enc(Value::Map(vec![
                (Value::from("allow"), Value::from(false)),
                (Value::from("message"), Value::from("premium only")),
            ]))),
            Some(Decision::Deny("premium only".into()))
        );
        assert_eq!(parse_reply(&enc(Value::from("yes"))), None);
        assert_eq!(
            parse_reply(&enc(Value::Map(vec![(Value::from("allow"), Value::from(1))]))),
            None
        );
        assert_eq!(parse_reply(b"\xc1"), None);
    }
}
