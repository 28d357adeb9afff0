//! Ingest: producer events in, one pre-targeted delivery per user out.
//!
//! Owns the `<prefix>.events.>` subscription (in the routers' queue group, so
//! each event is handled by one router), decoding, deduplication by
//! producer `id`, targeting and publishing. A malformed event is logged and
//! counted, never fatal. It must not hold a state lock while publishing.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Subscriber;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use switchyard_common::delivery::encode_delivery;
use switchyard_common::event::{is_json_content_type, parse_event, ProducerEvent, Target};
use switchyard_common::subject::{Subjects, ROUTER_QUEUE_GROUP};
use switchyard_common::subscription::{MatchQuery, Subscription};
use switchyard_common::transcode;
use tokio_util::sync::CancellationToken;

use crate::state::RouterState;

/// Producer ids seen within the dedup window.
pub type DedupCache = moka::sync::Cache<String, ()>;

/// Builds the dedup cache for a window.
pub fn dedup_cache(window: Duration) -> DedupCache {
    moka::sync::Cache::builder()
        .max_capacity(1_000_000)
        .time_to_live(window)
        .build()
}

/// Turns events into deliveries; one per router process.
pub struct Ingest {
    client: async_nats::Client,
    subjects: Subjects,
    state: Arc<RouterState>,
    dedup: DedupCache,
    /// Reused across events so targeting allocates nothing per candidate.
    matches: Vec<(Arc<str>, Arc<Subscription>)>,
    /// Delivery bodies are carved out of this buffer.
    out: BytesMut,
    scratch: Vec<u8>,
    body_buf: Vec<u8>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Ingest {
    /// An ingest stage publishing through `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects, state: Arc<RouterState>, dedup: DedupCache) -> Ingest {
        Ingest {
            client,
            subjects,
            state,
            dedup,
            matches: Vec::new(),
            out: BytesMut::with_capacity(64 * 1024),
            scratch: Vec::new(),
            body_buf: Vec::new(),
        }
    }

    /// Subscribes to producer events (in the routers' queue group).
    pub async fn subscribe(&self) -> Result<Subscriber, async_nats::SubscribeError> {
        self.client
            .queue_subscribe(self.subjects.events_wildcard(), ROUTER_QUEUE_GROUP.to_string())
            .await
    }

    /// Consumes events from `events` (see [`Ingest::subscribe`]) until cancelled.
    pub async fn run(mut self, mut events: Subscriber, cancel: CancellationToken) {
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => break,
                msg = events.next() => match msg { Some(m) => m, None => break },
            };
            self.handle(&msg).await;
        }
    }

    /// Handles one producer message.
    pub async fn handle(&mut self, msg: &async_nats::Message) {
        metrics::counter!("switchyard_router_events_total").increment(1);
        let Some((ty, key)) = self.subjects.parse_event(msg.subject.as_str()) else {
            metrics::counter!("switchyard_router_events_malformed_total", "reason" => "subject").increment(1);
            tracing::warn!(subject = %msg.subject, "event on a subject outside <prefix>.events.<type>[.<key>]");
            return;
        };
        let json = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .is_some_and(|v| is_json_content_type(v.as_str()));
        let event = match parse_event(ty, key, &msg.payload, json) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("switchyard_router_events_malformed_total", "reason" => e.reason()).increment(1);
                tracing::warn!(subject = %msg.subject, error = %e, "malformed producer event dropped");
                return;
            }
        };
        if let Some(id) = &event.id {
            let mut fresh = false;
            self.dedup.entry_by_ref(id).or_insert_with(|| fresh = true);
            if !fresh {
                metrics::counter!("switchyard_router_events_duplicate_total").increment(1);
                return;
            }
        }
        let deliveries = self.deliver(&event).await;
        metrics::counter!("switchyard_router_deliveries_total").increment(deliveries as u64);
    }

    async fn deliver(&mut self, event: &ProducerEvent) -> usize {
        let ts = now_ms();
        match &event.target {
            Target::Users(users) => {
                let body = self.body(event, ts, &[], None);
                for u in users {
                    self.publish(self.user_subject(event, u), body.clone()).await;
                }
                users.len()
            }
            Target::Room(room) => {
                let mut members: Vec<Arc<str>> = Vec::new();
                self.state
                    .rooms
                    .read()
                    .expect("rooms lock")
                    .for_each_member(room, |u| members.push(u.clone()));
                let body = self.body(event, ts, &[], None);
                for u in &members {
                    self.publish(self.user_subject(event, u), body.clone()).await;
                }
                members.len()
            }
            Target::All => {
                let body = self.body(event, ts, &[], None);
                let subject = if event.durable {
                    self.subjects.deliver_all()
                } else {
                    self.subjects.live_all()
                };
                self.publish(subject, body).await;
                1
            }
            Target::Match {
                sub_type,
                dimensions,
                values,
            } => {
                let started = Instant::now();
                let mut matches = std::mem::take(&mut self.matches);
                matches.clear();
                {
                    let index = self.state.index.read().expect("index lock");
                    let query = MatchQuery {
                        sub_type,
                        dimensions,
                        values,
                    };
                    index.for_each_match(&query, &mut |u, s| matches.push((u.clone(), s.clone())));
                }
                metrics::histogram!("switchyard_router_match_seconds").record(started.elapsed().as_secs_f64());
                matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
                let mut delivered = 0;
                let mut names: Vec<&str> = Vec::new();
                for group in matches.chunk_by(|a, b| a.0 == b.0) {
                    names.clear();
                    names.extend(group.iter().map(|(_, s)| s.name.as_str()));
                    let fields = fields_union(group.iter().map(|(_, s)| s.as_ref()));
                    let body = self.body(event, ts, &names, fields.as_deref());
                    self.publish(self.user_subject(event, &group[0].0), body).await;
                    delivered += 1;
                }
                self.matches = matches;
                delivered
            }
        }
    }

    /// Durable deliveries go to the log (which republishes them live with a
    /// position); non-durable ones straight to the live subject.
    fn user_subject(&self, event: &ProducerEvent, user: &str) -> String {
        if event.durable {
            self.subjects.deliver(user)
        } else {
            self.subjects.live(user)
        }
    }

    /// Encodes one delivery body, trimming `data` to `fields` when asked.
    fn body(&mut self, event: &ProducerEvent, ts: u64, subs: &[&str], fields: Option<&[&str]>) -> Bytes {
        let mut trimmed = std::mem::take(&mut self.scratch);
        trimmed.clear();
        let use_trimmed = match fields {
            None => false,
            Some(fields) => match transcode::trim_map_fields(&event.data, &|k| fields.contains(&k), &mut trimmed) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "payload not trimmable; sent whole");
                    false
                }
            },
        };
        let data: &[u8] = if use_trimmed { &trimmed } else { &event.data };
        let body = self.scratch_body(event, ts, subs, data);
        self.scratch = trimmed;
        body
    }

    fn scratch_body(&mut self, event: &ProducerEvent, ts: u64, subs: &[&str], data: &[u8]) -> Bytes {
        let mut body = std::mem::take(&mut self.body_buf);
        body.clear();
        encode_delivery(event, ts, subs, data, &mut body);
        if self.out.capacity() < body.len() {
            self.out.reserve(body.len().max(64 * 1024));
        }
        self.out.extend_from_slice(&body);
        self.body_buf = body;
        self.out.split().freeze()
    }

    async fn publish(&self, subject: String, body: Bytes) {
        if let Err(e) = self.client.publish(subject, body).await {
            metrics::counter!("switchyard_router_publish_errors_total").increment(1);
            tracing::error!(error = %e, "publishing a delivery failed");
        }
    }
}

/// The union of `fields` over a user's matching subscriptions; `None` when
/// any of them wants the whole payload.
fn fields_union<'a>(subs: impl Iterator<Item = &'a Subscription>) -> Option<Vec<&'a str>> {
    let mut out: Vec<&str> = Vec::new();
    for s in subs {
        out.extend(s.fields.as_ref()?.iter().map(String::as_str));
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}
