//! The match stage's pure step: one producer event → its targets, grouped
//! by user partition ([`Fanout`]), each user with their body.
//!
//! Direct users, a room's members, every user (broadcast), or the users
//! whose subscriptions match (each with the names of their matching
//! subscriptions and the union of their `fields`; users who agree share one
//! body). It reads the in-memory index and rooms and nothing else: no NATS,
//! no awaiting, so it is tested on its own ([`crate::ingest`] sends what it
//! produces). Locks are held only while reading.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use switchyard_common::delivery::{encode_delivery_with, BodyExtras};
use switchyard_common::event::{Prio, ProducerEvent, Target};
use switchyard_common::subscription::MatchQuery;
use switchyard_common::transcode;

use crate::handoff::Fanout;
use crate::index::SubRef;
use crate::state::RouterState;

/// One body of an event: the subscription names, `fields` and throttle it
/// was made for, and its bytes.
type Variant<'a> = (Vec<&'a str>, Option<Vec<&'a str>>, Option<NonZeroU32>, Bytes);

/// Distinct bodies of one event compared before a user's body is encoded anew.
const MAX_VARIANTS: usize = 32;

/// Turns events into targets; keeps its buffers between events so that
/// targeting allocates nothing per candidate.
#[derive(Default)]
pub struct Targeter {
    /// Reused across events.
    matches: Vec<(Arc<str>, SubRef)>,
    /// Delivery bodies are carved out of this buffer.
    out: BytesMut,
    scratch: Vec<u8>,
    body_buf: Vec<u8>,
}

impl Targeter {
    /// Adds the targets of `event` (published at `ts`, unix ms) to `fanout`,
    /// which the caller has begun for this event and ends after. Returns the
    /// number of deliveries (users, or 1 for a broadcast).
    pub fn target(&mut self, state: &RouterState, event: &ProducerEvent, ts: u64, fanout: &mut Fanout) -> usize {
        match &event.target {
            Target::Users(users) => {
                let body = self.body(event, ts, &[], None);
                for u in users {
                    fanout.to_user(u, 0, &body);
                }
                users.len()
            }
            Target::Room(room) => {
                let body = self.body(event, ts, &[], None);
                let rooms = state.rooms.read().expect("rooms lock");
                let mut n = 0;
                rooms.for_each_member(room, |u| {
                    fanout.to_user(u, 0, &body);
                    n += 1;
                });
                n
            }
            Target::All => {
                let body = self.body(event, ts, &[], None);
                fanout.to_all(&body);
                1
            }
            Target::Match {
                sub_type,
                dimensions,
                values,
            } => {
                let query = MatchQuery {
                    sub_type,
                    dimensions,
                    values,
                };
                self.target_matches(state, event, ts, &query, fanout)
            }
        }
    }

    /// Matches the event against the index and names each matching user
    /// with their body (their matching subscription names and `fields`);
    /// users whose names and fields agree share one body.
    fn target_matches(
        &mut self,
        state: &RouterState,
        event: &ProducerEvent,
        ts: u64,
        query: &MatchQuery<'_>,
        fanout: &mut Fanout,
    ) -> usize {
        let started = Instant::now();
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        {
            let index = state.index.read().expect("index lock");
            index.for_each_match(query, &mut |u, s| matches.push((u.clone(), s.clone())));
        }
        metrics::histogram!("switchyard_router_match_seconds").record(started.elapsed().as_secs_f64());
        matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name().cmp(b.1.name())));
        let mut delivered = 0;
        let mut names: Vec<&str> = Vec::new();
        // Bodies of this event so far: (names, fields, throttle, bytes).
        let mut variants: Vec<Variant<'_>> = Vec::new();
        let throttleable = event.key.is_some() && event.prio != Prio::Critical;
        for group in matches.chunk_by(|a, b| a.0 == b.0) {
            names.clear();
            names.extend(group.iter().map(|(_, s)| s.name()));
            let fields = fields_union(group.iter().map(|(_, s)| s));
            let throttle = if throttleable {
                effective_throttle(group.iter().map(|(_, s)| s))
            } else {
                None
            };
            let found = variants
                .iter()
                .take(MAX_VARIANTS)
                .position(|(n, f, t, _)| *n == names && *f == fields && *t == throttle);
            let v = match found {
                Some(v) => v,
                None => {
                    let body = self.body_with(event, ts, &names, fields.as_deref(), throttle);
                    variants.push((names.clone(), fields, throttle, body));
                    variants.len() - 1
                }
            };
            fanout.to_user(&group[0].0, v as u32, &variants[v].3);
            delivered += 1;
        }
        drop(variants);
        drop(names);
        self.matches = matches;
        delivered
    }

    /// Encodes one delivery body, trimming `data` to `fields` when asked.
    fn body(&mut self, event: &ProducerEvent, ts: u64, subs: &[&str], fields: Option<&[&str]>) -> Bytes {
        self.body_with(event, ts, subs, fields, None)
    }

    /// [`Targeter::body`] carrying the user's effective throttle to the edge.
    fn body_with(
        &mut self,
        event: &ProducerEvent,
        ts: u64,
        subs: &[&str],
        fields: Option<&[&str]>,
        throttle_ms: Option<NonZeroU32>,
    ) -> Bytes {
        let mut trimmed = std::mem::take(&mut self.scratch);
        let data = match fields {
            None => &event.data[..],
            Some(fields) => transcode::fields_of(&event.data, &|k| fields.contains(&k), &mut trimmed),
        };
        let body = self.scratch_body(
            event,
            ts,
            subs,
            data,
            BodyExtras {
                throttle_ms,
                ..BodyExtras::default()
            },
        );
        self.scratch = trimmed;
        body
    }

    fn scratch_body(
        &mut self,
        event: &ProducerEvent,
        ts: u64,
        subs: &[&str],
        data: &[u8],
        extras: BodyExtras,
    ) -> Bytes {
        let mut body = std::mem::take(&mut self.body_buf);
        body.clear();
        encode_delivery_with(event, ts, subs, data, extras, &mut body);
        if self.out.capacity() < body.len() {
            self.out.reserve(body.len().max(64 * 1024));
        }
        self.out.extend_from_slice(&body);
        self.body_buf = body;
        self.out.split().freeze()
    }
}

/// The throttle of an event (with a key, not `critical`) for a user whose
/// matching subscriptions are `subs`: the smallest `throttle_ms` among them,
/// or `None` when any of them is unthrottled (docs/PROTOCOL.md: an event
/// that also matches an unthrottled subscription is not throttled).
fn effective_throttle<'a>(subs: impl Iterator<Item = &'a SubRef>) -> Option<NonZeroU32> {
    let mut min: Option<NonZeroU32> = None;
    for s in subs {
        let t = s.throttle_ms()?;
        min = Some(min.map_or(t, |m| m.min(t)));
    }
    min
}

/// The union of `fields` over a user's matching subscriptions; `None` when
/// any of them wants the whole payload.
fn fields_union<'a>(subs: impl Iterator<Item = &'a SubRef>) -> Option<Vec<&'a str>> {
    let mut out: Vec<&str> = Vec::new();
    for s in subs {
        out.extend(s.fields()?);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use switchyard_common::fanout::HandoffReader;
    use switchyard_common::subscription::Subscription;

    use super::*;
    use crate::change::Change;
    use crate::state::Limits;

    const PARTITIONS: u32 = 4;

    fn state() -> Arc<RouterState> {
        RouterState::new(Limits::with_max_subscriptions(10))
    }

    fn subscribe(state: &RouterState, user: &str, name: &str, region: &str, fields: Option<&[&str]>) {
        subscribe_throttled(state, user, name, region, fields, None)
    }

    fn subscribe_throttled(
        state: &RouterState,
        user: &str,
        name: &str,
        region: &str,
        fields: Option<&[&str]>,
        throttle_ms: Option<u32>,
    ) {
        let sub = Subscription {
            name: name.into(),
            sub_type: "price".into(),
            filters: [("region".to_string(), [region.to_string()].into_iter().collect())]
                .into_iter()
                .collect(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: fields.map(|f| f.iter().map(|s| s.to_string()).collect()),
            throttle_ms,
        };
        state.apply_change(&Change::Subscribe { user: user.into(), sub });
    }

    fn event(target: serde_json::Value) -> ProducerEvent {
        let raw = serde_json::json!({"type": "price", "data": {"p": 1, "q": 2}, "target": target});
        let payload = Bytes::from(serde_json::to_vec(&raw).unwrap());
        switchyard_common::event::parse_event("price", None, &payload, true).unwrap()
    }

    /// Per user (or `*` for a broadcast): the user partition and the body, decoded.
    fn targets(state: &RouterState, event: &ProducerEvent) -> (usize, BTreeMap<String, (u32, rmpv::Value)>) {
        let (n, raw) = raw_targets(state, event);
        let decode = |b: &Bytes| rmpv::decode::read_value(&mut &b[..]).unwrap();
        (n, raw.into_iter().map(|(u, (p, b))| (u, (p, decode(&b)))).collect())
    }

    /// Per user (or `*` for a broadcast): the user partition and the body.
    fn raw_targets(state: &RouterState, event: &ProducerEvent) -> (usize, BTreeMap<String, (u32, Bytes)>) {
        let mut fanout = Fanout::new(PARTITIONS);
        fanout.begin("st:1", true);
        let n = Targeter::default().target(state, event, 7, &mut fanout);
        fanout.end();
        let mut out = BTreeMap::new();
        let (mut bodies, mut users) = (Vec::new(), Vec::new());
        let mut msgs = Vec::new();
        fanout.drain(|p, _, msg| msgs.push((p, msg)));
        for (p, msg) in &msgs {
            let p = *p;
            let mut r = HandoffReader::new(msg).unwrap();
            while let Some(e) = r.next_event(&mut bodies, &mut users).unwrap() {
                if e.broadcast {
                    out.insert("*".to_string(), (p, bodies[0].clone()));
                }
                for (u, i) in &users {
                    assert_eq!(switchyard_common::fanout::user_partition(u, PARTITIONS), p, "{u}");
                    out.insert(u.to_string(), (p, bodies[*i as usize].clone()));
                }
            }
        }
        (n, out)
    }

    fn field<'a>(body: &'a rmpv::Value, name: &str) -> Option<&'a rmpv::Value> {
        body.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    }

    fn data_keys(body: &rmpv::Value) -> BTreeSet<String> {
        field(body, "data")
            .and_then(|d| d.as_map())
            .map(|m| m.iter().filter_map(|(k, _)| k.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn direct_users_each_in_their_partition_with_the_whole_body() {
        let (n, out) = targets(&state(), &event(serde_json::json!({"users": ["a", "b", "c"]})));
        assert_eq!(n, 3);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        for (_, body) in out.values() {
            assert_eq!(data_keys(body), ["p", "q"].map(String::from).into());
            assert_eq!(field(body, "ts").and_then(|t| t.as_u64()), Some(7));
            assert!(
                field(body, "sub").is_none(),
                "no subscription names on a direct delivery"
            );
        }
    }

    #[test]
    fn room_members_and_broadcasts() {
        let s = state();
        s.apply_change(&Change::Join {
            room: "r1".into(),
            user: "a".into(),
        });
        s.apply_change(&Change::Join {
            room: "r1".into(),
            user: "b".into(),
        });
        s.apply_change(&Change::Join {
            room: "r2".into(),
            user: "c".into(),
        });
        let (n, out) = targets(&s, &event(serde_json::json!({"room": "r1"})));
        assert_eq!(n, 2);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["a", "b"]);
        let (n, out) = targets(&s, &event(serde_json::json!({"all": true})));
        assert_eq!(n, 1);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["*"], "a broadcast names no user");
    }

    #[test]
    fn matching_users_get_their_subscription_names_and_fields() {
        let s = state();
        subscribe(&s, "a", "eu", "eu", None);
        subscribe(&s, "a", "eu-p", "eu", Some(&["p"]));
        subscribe(&s, "b", "only-p", "eu", Some(&["p"]));
        subscribe(&s, "c", "us", "us", None);
        let (n, out) = targets(&s, &event(serde_json::json!({"match": {"region": "eu"}})));
        assert_eq!(n, 2);
        assert_eq!(
            out.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "c's subscription does not match"
        );
        let names = |u: &str| -> Vec<&str> {
            field(&out[u].1, "sub")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default()
        };
        assert_eq!(names("a"), ["eu", "eu-p"]);
        assert_eq!(names("b"), ["only-p"]);
        // a's subscriptions together want the whole payload; b's only `p`.
        assert_eq!(data_keys(&out["a"].1), ["p", "q"].map(String::from).into());
        assert_eq!(data_keys(&out["b"].1), ["p"].map(String::from).into());
    }

    #[test]
    fn the_effective_throttle_is_the_smallest_unless_one_match_is_unthrottled() {
        let s = state();
        // a: two throttled matches → the smaller; b: one throttled and one
        // not → unthrottled; c: unthrottled only; d: throttled, other region.
        subscribe_throttled(&s, "a", "slow", "eu", None, Some(1000));
        subscribe_throttled(&s, "a", "fast", "eu", None, Some(250));
        subscribe_throttled(&s, "b", "slow", "eu", None, Some(1000));
        subscribe(&s, "b", "all", "eu", None);
        subscribe(&s, "c", "all", "eu", None);
        subscribe_throttled(&s, "d", "slow", "us", None, Some(1000));
        let throttles = |ev: &ProducerEvent| -> BTreeMap<String, Option<u32>> {
            raw_targets(&s, ev)
                .1
                .into_iter()
                .map(|(u, (_, b))| {
                    let meta = switchyard_common::delivery::peek_meta(&b).unwrap();
                    (u, meta.throttle_ms.map(NonZeroU32::get))
                })
                .collect()
        };
        let mut keyed = event(serde_json::json!({"match": {"region": "eu"}}));
        keyed.key = Some("AAPL".into());
        let got = throttles(&keyed);
        assert_eq!(got["a"], Some(250));
        assert_eq!(got["b"], None, "b also matches an unthrottled subscription");
        assert_eq!(got["c"], None);
        assert!(!got.contains_key("d"));
        // Without a key, or critical: never throttled.
        let unkeyed = event(serde_json::json!({"match": {"region": "eu"}}));
        assert_eq!(throttles(&unkeyed)["a"], None);
        keyed.prio = Prio::Critical;
        assert_eq!(throttles(&keyed)["a"], None);
        // The internal entry never changes what clients see: a's body
        // decodes to the same fields as an unthrottled one would have.
        keyed.prio = Prio::Normal;
        let body = &raw_targets(&s, &keyed).1["a"].1;
        let mut frame = Vec::new();
        switchyard_common::delivery::write_event_frame(switchyard_common::Encoding::Json, body, None, &mut frame)
            .unwrap();
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(!text.contains("~t"), "{text}");
        assert!(text.contains(r#""sub":["fast","slow"]"#), "{text}");
    }
}
