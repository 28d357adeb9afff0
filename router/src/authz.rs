//! Authorization of joins and subscription types.
//!
//! A request is allowed, in this order, by the token's `rooms` claim (joins
//! only), by the operator's public rooms or public subscription types, or,
//! when the operator turns it on, by the application answering a NATS
//! request on `<prefix>.authz.<kind>`. No answer in time, no responder or
//! an undecodable answer means deny: a broken hook must never open access.
//!
//! The application's decisions are cached (bounded in bytes, with a TTL)
//! under everything the request carries: kind, user, roles, rooms, target
//! (the room, or the subscription type) and, for subscriptions, the filters
//! (canonically encoded), since the application may decide on any of them.
//! A user re-subscribing on every page load costs one request per TTL.
//!
//! Wire format (MessagePack maps): request `{"kind","user","roles","rooms",
//! "room"}` for `join`, `{"kind","user","roles","rooms","type","filters"}` for
//! `subscribe`; reply `{"allow":bool,"message"?:string}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
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

/// Where authorization questions go: the application over NATS (or a
/// stand-in in tests). The caller bounds the wait.
pub trait Hook: Send + Sync {
    /// Sends `payload` on `subject`; the reply's payload, or why there is none.
    fn request(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>>;
}

impl Hook for async_nats::Client {
    fn request(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            async_nats::Client::request(self, subject, payload)
                .await
                .map(|m| m.payload)
                .map_err(|e| e.to_string())
        })
    }
}

/// Everything an application request carries, so a cached decision is
/// reused only for the very same question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    kind: &'static str,
    user: String,
    roles: Vec<String>,
    rooms: Vec<String>,
    target: String,
    /// [`canonical_filters`] of a subscription; empty for joins.
    filters: Vec<u8>,
}

impl CacheKey {
    /// Roughly the bytes the entry holds, for the cache's byte bound.
    fn weight(&self) -> u32 {
        let strings = |v: &[String]| v.iter().map(|s| s.len() + 24).sum::<usize>();
        let n = 160
            + self.user.len()
            + self.target.len()
            + self.filters.len()
            + strings(&self.roles)
            + strings(&self.rooms);
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Most bytes of cached decisions (keys carry filters, up to tens of KB each).
const CACHE_BYTES: u64 = 64 << 20;

/// One unambiguous byte string per filter set: dimensions in order (the map
/// is sorted), each with its values (sorted and deduplicated by
/// normalization), every string length-prefixed.
fn canonical_filters(filters: &BTreeMap<String, Vec<String>>) -> Vec<u8> {
    let len: usize = filters
        .iter()
        .map(|(k, vs)| 8 + k.len() + vs.iter().map(|v| 4 + v.len()).sum::<usize>())
        .sum();
    let mut out = Vec::with_capacity(len);
    let mut put = |s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    for (dim, values) in filters {
        put(dim);
        put(&values.len().to_string());
        for v in values {
            put(v);
        }
    }
    out
}

/// The authorization policy of one router.
pub struct Authz {
    settings: AuthzSettings,
    hook: Arc<dyn Hook>,
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
        Authz::with_hook(settings, Arc::new(client), subjects)
    }

    /// A policy asking `hook` when configured.
    pub fn with_hook(settings: AuthzSettings, hook: Arc<dyn Hook>, subjects: Subjects) -> Authz {
        let cache = moka::sync::Cache::builder()
            .max_capacity(CACHE_BYTES)
            .weigher(|k: &CacheKey, _: &Decision| k.weight())
            .time_to_live(settings.cache_ttl.max(Duration::from_millis(1)))
            .build();
        Authz {
            settings,
            hook,
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
        self.ask(
            "join",
            caller,
            room,
            None,
            request,
            format!("not allowed to join {room:?}"),
        )
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
            Some(&sub.filters),
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
        filters: Option<&BTreeMap<String, Vec<String>>>,
        request: impl FnOnce() -> Vec<(Value, Value)>,
        denial: String,
    ) -> Decision {
        if !self.settings.ask_application {
            return Decision::Deny(denial);
        }
        let key = CacheKey {
            kind,
            user: caller.user.to_string(),
            roles: caller.roles.to_vec(),
            rooms: caller.rooms.to_vec(),
            target: target.to_string(),
            filters: filters.map(canonical_filters).unwrap_or_default(),
        };
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
        let answer = tokio::time::timeout(self.settings.timeout, self.hook.request(subject, payload.into())).await;
        let decision = match answer {
            Ok(Ok(reply)) => match parse_reply(&reply) {
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

    /// Answers `allow` to everything and keeps the requests it saw.
    #[derive(Default)]
    struct Recorder {
        requests: std::sync::Mutex<Vec<Value>>,
    }

    impl Hook for Recorder {
        fn request(&self, _subject: String, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
            let request = rmpv::decode::read_value(&mut &payload[..]).expect("a MessagePack request");
            self.requests.lock().unwrap().push(request);
            let mut reply = Vec::new();
            rmpv::encode::write_value(&mut reply, &Value::Map(vec![(Value::from("allow"), Value::from(true))]))
                .unwrap();
            Box::pin(async move { Ok(Bytes::from(reply)) })
        }
    }

    fn asking() -> AuthzSettings {
        AuthzSettings {
            public_rooms: vec![],
            public_types: vec![],
            ask_application: true,
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(3600),
        }
    }

    fn sub(name: &str, ty: &str, filters: &[(&str, &[&str])]) -> Subscription {
        Subscription {
            name: name.into(),
            sub_type: ty.into(),
            filters: filters
                .iter()
                .map(|(d, vs)| (d.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: None,
            throttle_ms: None,
        }
    }

    #[tokio::test]
    async fn subscriptions_differing_only_in_filters_each_reach_the_hook() {
        let hook = Arc::new(Recorder::default());
        let authz = Authz::with_hook(asking(), hook.clone(), Subjects::default());
        let caller = Caller {
            user: "alice",
            roles: &[],
            rooms: &[],
        };
        let asked = || hook.requests.lock().unwrap().len();
        let aapl = sub("a", "tick", &[("symbol", &["AAPL"])]);
        let msft = sub("a", "tick", &[("symbol", &["MSFT"])]);
        assert_eq!(authz.subscribe(caller, &aapl).await, Decision::Allow);
        assert_eq!(authz.subscribe(caller, &msft).await, Decision::Allow);
        assert_eq!(asked(), 2, "the second question was answered from the first's cache");
        let filters: Vec<_> = hook
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r["filters"].to_string())
            .collect();
        assert_ne!(filters[0], filters[1]);
        // No filters at all is a question of its own too.
        assert_eq!(authz.subscribe(caller, &sub("a", "tick", &[])).await, Decision::Allow);
        assert_eq!(asked(), 3);
        // The very same question (under another subscription name) is cached.
        assert_eq!(
            authz
                .subscribe(caller, &sub("b", "tick", &[("symbol", &["AAPL"])]))
                .await,
            Decision::Allow
        );
        assert_eq!(asked(), 3);
        // So are the other parts of the request: rooms, roles, user.
        let rooms = ["desk:*".to_string()];
        let with_rooms = Caller {
            rooms: &rooms,
            ..caller
        };
        assert_eq!(authz.subscribe(with_rooms, &aapl).await, Decision::Allow);
        assert_eq!(asked(), 4);
    }

    #[test]
    fn the_canonical_encoding_of_filters_is_unambiguous() {
        let enc = |f: &[(&str, &[&str])]| canonical_filters(&sub("a", "t", f).filters);
        assert_ne!(enc(&[("a", &["bc"])]), enc(&[("ab", &["c"])]));
        assert_ne!(enc(&[("a", &["b", "c"])]), enc(&[("a", &["b"]), ("c", &[])]));
        assert_ne!(enc(&[("a", &["b,c"])]), enc(&[("a", &["b", "c"])]));
        assert_eq!(
            enc(&[("x", &["1"]), ("a", &["2"])]),
            enc(&[("a", &["2"]), ("x", &["1"])])
        );
        assert!(enc(&[]).is_empty());
    }
}
