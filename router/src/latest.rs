//! The latest keyed event of each (type, key), for `snapshot: true`
//! (docs/PROTOCOL.md, "Snapshots").
//!
//! Kept in NATS: a stream holding one message per `<prefix>.latest.<type>.<key>`
//! subject, with the operator's retention, so it survives routers. The
//! match stage writes each keyed, subscription-targeted event there
//! ([`Latest::write`]) and waits for those writes to be stored before it
//! matches their batch. Every router reads the stream back into memory
//! (an ordered consumer from the last message of each subject on), so a
//! snapshot is a scan of one type's keys in memory, no NATS request per key.
//!
//! Why no event is missed by both the snapshot and the live path: an event
//! matched without the new subscription was stored here before its batch
//! caught up with the subscription bucket, so before the subscription was
//! written; a snapshot is read after the subscription is written, from a
//! cache that has applied everything the stream held when the snapshot
//! began ([`Latest::snapshot`] waits for that).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::context::{CreateStreamError, PublishAckFuture};
use async_nats::jetstream::stream::{Config, DiscardPolicy};
use bytes::Bytes;
use futures::StreamExt;
use serde_bytes::ByteBuf;
use switchyard_common::delivery::{encode_delivery_with, BodyExtras};
use switchyard_common::event::{ProducerEvent, Target};
use switchyard_common::latest;
use switchyard_common::subject::Subjects;
use switchyard_common::subscription::{MatchQuery, Subscription};
use switchyard_common::transcode;
use switchyard_runtime::clock::now_ms;
use switchyard_runtime::nats::Storage;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Most bytes of snapshot bodies in one answer (below NATS' default 1 MiB
/// max payload, with room for the reply's framing).
pub const MAX_SNAPSHOT_BYTES: usize = 900 * 1024;
/// How long a snapshot waits for this router's copy to catch up with the stream.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
/// How often keys past the retention leave this router's copy (the stream
/// drops them by itself, without telling its readers).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Operator settings of the latest-event store.
#[derive(Debug, Clone, Copy)]
pub struct LatestSettings {
    /// How long a key's latest event is kept (and offered in snapshots).
    pub retention: Duration,
    /// Most keys kept per type; events of further keys are not kept. 0
    /// keeps nothing (snapshots are then always empty).
    pub max_keys_per_type: usize,
    /// Stream storage.
    pub storage: Storage,
    /// Stream replicas.
    pub replicas: usize,
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LatestError {
    /// The stream could not be created.
    #[error("cannot create the latest-event stream")]
    Stream(#[from] CreateStreamError),
    /// The stream could not be read.
    #[error("cannot read the latest-event stream")]
    Consumer(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One key's latest event.
struct Kept {
    event: ProducerEvent,
    ts: u64,
}

/// The latest-event store, and this router's copy of it.
pub struct Latest {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    settings: LatestSettings,
    stream: String,
    /// Subscription type (the events' target type) → key token → latest event.
    kept: RwLock<HashMap<String, HashMap<String, Kept>>>,
    /// Stream sequence applied last.
    applied: watch::Sender<u64>,
    /// The stream's last sequence, and when that read started, shared by
    /// snapshots that begin together (a reconnect storm re-subscribing
    /// reads the stream state once, not once per client).
    last_read: tokio::sync::Mutex<(Instant, u64)>,
}

/// Creates the stream if it is missing.
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    settings: &LatestSettings,
) -> Result<(), CreateStreamError> {
    js.create_or_update_stream(Config {
        name: subjects.latest_stream(),
        description: Some("Switchyard: the latest keyed event of each (type, key), for snapshots".into()),
        subjects: vec![subjects.latest_wildcard()],
        max_messages_per_subject: 1,
        max_age: settings.retention,
        discard: DiscardPolicy::Old,
        storage: settings.storage.into(),
        num_replicas: settings.replicas,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map(|_| ())
}

impl Latest {
    /// Opens the store and starts copying it into memory; the copy is kept
    /// current by the returned task until `cancel`.
    pub async fn start(
        js: async_nats::jetstream::Context,
        subjects: Subjects,
        settings: LatestSettings,
        cancel: CancellationToken,
    ) -> Result<(Arc<Latest>, impl std::future::Future<Output = ()>), LatestError> {
        ensure_stream(&js, &subjects, &settings).await?;
        let latest = Arc::new(Latest {
            stream: subjects.latest_stream(),
            js,
            subjects,
            settings,
            kept: RwLock::new(HashMap::new()),
            applied: watch::channel(0).0,
            last_read: tokio::sync::Mutex::new((Instant::now() - Duration::from_secs(3600), 0)),
        });
        let copier = latest.clone().copy(cancel);
        Ok((latest, copier))
    }

    /// Stores `event` (published at `ts`) as its key's latest, when it is
    /// keyed and targets subscriptions; the acknowledgement to wait for.
    /// A key beyond the type's bound is not kept (counted).
    pub async fn write(&self, event: &ProducerEvent, ts: u64, out: &mut Vec<u8>) -> Option<PublishAckFuture> {
        let (Target::Match { sub_type, .. }, Some(key)) = (&event.target, event.key.as_deref()) else {
            return None;
        };
        if self.settings.max_keys_per_type == 0 {
            // Snapshots turned off.
            return None;
        }
        let token = latest::key_token(key);
        if self.full(sub_type, &token) {
            metrics::counter!("switchyard_router_latest_keys_refused_total").increment(1);
            return None;
        }
        out.clear();
        latest::encode(event, ts, out)?;
        let subject = self.subjects.latest(sub_type, &token);
        match self.js.publish(subject, Bytes::copy_from_slice(out)).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                metrics::counter!("switchyard_router_latest_write_errors_total").increment(1);
                tracing::warn!(error = %e, "storing a latest event failed");
                None
            }
        }
    }

    fn full(&self, sub_type: &str, token: &str) -> bool {
        let kept = self.kept.read().expect("latest lock");
        kept.get(sub_type)
            .is_some_and(|keys| keys.len() >= self.settings.max_keys_per_type && !keys.contains_key(token))
    }

    /// The snapshot of `sub`: the latest event of every key of its type
    /// that matches it (within the retention), as delivery bodies marked
    /// `snapshot` with the subscription's name (and its `fields`), at most
    /// [`MAX_SNAPSHOT_BYTES`] of them.
    pub async fn snapshot(&self, sub: &Subscription) -> Vec<ByteBuf> {
        let started = Instant::now();
        self.catch_up(started).await;
        let oldest = now_ms().saturating_sub(self.settings.retention.as_millis() as u64);
        let mut bodies = Vec::new();
        let mut bytes = 0usize;
        let mut trimmed = Vec::new();
        let kept = self.kept.read().expect("latest lock");
        if let Some(keys) = kept.get(&sub.sub_type) {
            for kept in keys.values() {
                let Target::Match {
                    sub_type,
                    dimensions,
                    values,
                } = &kept.event.target
                else {
                    continue;
                };
                let query = MatchQuery {
                    sub_type,
                    dimensions,
                    values,
                };
                if kept.ts < oldest || !sub.matches(&query) {
                    continue;
                }
                let data = match &sub.fields {
                    Some(fields) => {
                        transcode::fields_of(&kept.event.data, &|k| fields.iter().any(|f| f == k), &mut trimmed)
                    }
                    None => &kept.event.data[..],
                };
                let mut body = Vec::with_capacity(data.len() + 64);
                let extras = BodyExtras {
                    snapshot: true,
                    ..BodyExtras::default()
                };
                encode_delivery_with(&kept.event, kept.ts, &[sub.name.as_str()], data, extras, &mut body);
                bytes += body.len();
                if bytes > MAX_SNAPSHOT_BYTES {
                    metrics::counter!("switchyard_router_snapshots_cut_total").increment(1);
                    tracing::warn!(sub = %sub.name, sub_type = %sub.sub_type, keys = bodies.len(), "snapshot cut at its byte limit");
                    break;
                }
                bodies.push(ByteBuf::from(body));
            }
        }
        metrics::histogram!("switchyard_router_snapshot_seconds").record(started.elapsed().as_secs_f64());
        bodies
    }

    /// Waits until this router's copy holds everything the stream held at
    /// `since` or later (bounded: a copy that cannot catch up answers from
    /// what it has).
    async fn catch_up(&self, since: Instant) {
        let target = {
            let mut last = self.last_read.lock().await;
            if last.0 < since {
                let read_at = Instant::now();
                match self.js.get_stream(&self.stream).await {
                    Ok(stream) => *last = (read_at, stream.cached_info().state.last_sequence),
                    Err(e) => tracing::warn!(error = %e, "latest-event stream state unreadable"),
                }
            }
            last.1
        };
        let mut applied = self.applied.subscribe();
        if tokio::time::timeout(CATCH_UP_WAIT, applied.wait_for(|a| *a >= target))
            .await
            .is_err()
        {
            tracing::warn!(target, "snapshot answered from a copy behind the latest-event stream");
        }
    }

    /// Copies the stream into memory until `cancel`, starting over (from
    /// the last message of each subject) when the consumer fails.
    async fn copy(self: Arc<Self>, cancel: CancellationToken) {
        let prefix = format!("{}.latest.", self.subjects.prefix());
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let messages = async {
                let stream = self.js.get_stream_no_info(&self.stream).await.map_err(box_err)?;
                let consumer = stream
                    .create_consumer(OrderedConfig {
                        filter_subject: self.subjects.latest_wildcard(),
                        deliver_policy: DeliverPolicy::LastPerSubject,
                        ..Default::default()
                    })
                    .await
                    .map_err(box_err)?;
                consumer.messages().await.map_err(box_err)
            };
            let mut messages = tokio::select! {
                _ = cancel.cancelled() => return,
                m = messages => match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %LatestError::Consumer(e), "latest-event copy not started; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = prune.tick() => {
                        self.prune();
                        continue;
                    }
                    m = messages.next() => m,
                };
                match msg {
                    Some(Ok(msg)) => {
                        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                        self.apply(msg.subject.as_str().strip_prefix(prefix.as_str()), &msg.payload);
                        self.applied.send_if_modified(|a| {
                            let newer = seq > *a;
                            *a = (*a).max(seq);
                            newer
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "latest-event copy interrupted; starting over");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// Drops keys past the retention, so they neither count against a
    /// type's bound nor stay in memory.
    fn prune(&self) {
        let oldest = now_ms().saturating_sub(self.settings.retention.as_millis() as u64);
        let mut kept = self.kept.write().expect("latest lock");
        for keys in kept.values_mut() {
            keys.retain(|_, k| k.ts >= oldest);
        }
        kept.retain(|_, keys| !keys.is_empty());
        let n: usize = kept.values().map(HashMap::len).sum();
        metrics::gauge!("switchyard_router_latest_keys").set(n as f64);
    }

    fn apply(&self, tail: Option<&str>, payload: &Bytes) {
        let Some((sub_type, token)) = tail.and_then(|t| t.split_once('.')) else {
            return;
        };
        let Ok((event, ts)) = latest::decode(payload) else {
            metrics::counter!("switchyard_router_latest_malformed_total").increment(1);
            return;
        };
        let mut kept = self.kept.write().expect("latest lock");
        // A key seen before (the usual case) is replaced without allocating.
        if let Some(k) = kept.get_mut(sub_type).and_then(|keys| keys.get_mut(token)) {
            *k = Kept { event, ts };
            return;
        }
        let keys = kept.entry(sub_type.to_string()).or_default();
        if keys.len() >= self.settings.max_keys_per_type {
            // Expired keys make room first.
            let oldest = now_ms().saturating_sub(self.settings.retention.as_millis() as u64);
            let before = keys.len();
            keys.retain(|_, k| k.ts >= oldest);
            metrics::gauge!("switchyard_router_latest_keys").decrement((before - keys.len()) as f64);
        }
        keys.insert(token.to_string(), Kept { event, ts });
        metrics::gauge!("switchyard_router_latest_keys").increment(1.0);
    }
}

fn box_err(e: impl std::error::Error + Send + Sync + 'static) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}
