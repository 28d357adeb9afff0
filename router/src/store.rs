//! Subscriptions and room memberships, persisted in a JetStream key-value
//! bucket (`<BASE>_SUBS`) that every router replays into its in-memory index.
//!
//! # Why a bucket and a watcher
//! A change accepted by any router is written to the bucket first; every
//! router (including the one that wrote it) applies it to its index only
//! from its watcher. There is therefore one order of changes, the bucket's,
//! and a restarted router rebuilds exactly the state the others hold.
//!
//! # The consistency check
//! PROTOCOL.md promises that `ok` to a change holds for every event
//! published after it, whichever router matches the event. The writer
//! answers `ok` only after the bucket stored the change; an event published
//! later is fetched later. Before matching a batch of events, a router calls
//! [`Store::catch_up`], which reads the bucket's last sequence (one
//! JetStream API request, made after the batch was fetched) and waits until
//! its watcher has applied at least that revision. The bucket has no
//! `max_age` and keeps one revision per key, so its last message is always
//! the latest value of some key and the watcher always reaches it.
//!
//! # Keys
//! `s.<user>.<subscription>` holds the normalized subscription
//! (MessagePack); `r.<room>.<user>` marks a membership, with `.` and `:` in
//! room names escaped as `=2E` and `=3A` (key tokens allow `=`, never `:`).
//! A removal is written as an empty value (a tombstone) rather than a
//! delete, so the write returns the revision that the writer then waits for.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use switchyard_common::control;
use switchyard_common::subject::Subjects;
use switchyard_common::subscription::Subscription;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::RouterState;

/// How long a caller waits for the watcher to apply a revision.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// A change to the subscription state, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace `sub` for `user`.
    Subscribe {
        /// The owner.
        user: String,
        /// The normalized subscription.
        sub: Subscription,
    },
    /// Remove `user`'s subscription `name`.
    Unsubscribe {
        /// The owner.
        user: String,
        /// The subscription name.
        name: String,
    },
    /// `user` joins `room`.
    Join {
        /// The room.
        room: String,
        /// The member.
        user: String,
    },
    /// `user` leaves `room`.
    Leave {
        /// The room.
        room: String,
        /// The member.
        user: String,
    },
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bucket could not be created or opened.
    #[error("cannot open the subscription bucket: {0}")]
    Open(String),
    /// A write failed.
    #[error("cannot store the change: {0}")]
    Put(#[from] kv::PutError),
    /// The bucket's state could not be read.
    #[error("cannot read the subscription bucket's state: {0}")]
    Info(String),
    /// The watcher did not apply the revision in time.
    #[error("the subscription index is behind the bucket (revision {0} not applied in time)")]
    Behind(u64),
    /// The watcher could not be started.
    #[error("cannot watch the subscription bucket: {0}")]
    Watch(#[from] kv::WatchError),
}

/// The subscription bucket and the revision this router's index has applied.
#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
    js: async_nats::jetstream::Context,
    stream: String,
    applied: Arc<watch::Sender<u64>>,
}

impl Store {
    /// Opens the bucket, creating it when missing (several routers may race to create it).
    pub async fn open(
        js: &async_nats::jetstream::Context,
        subjects: &Subjects,
        replicas: usize,
        memory: bool,
    ) -> Result<Store, StoreError> {
        let bucket = subjects.store_bucket();
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "Switchyard subscriptions and room memberships".into(),
            history: 1,
            num_replicas: replicas,
            storage: if memory {
                async_nats::jetstream::stream::StorageType::Memory
            } else {
                async_nats::jetstream::stream::StorageType::File
            },
            ..Default::default()
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            if let Ok(kv) = js.get_key_value(bucket.as_str()).await {
                return Ok(Store::with(kv, js, &bucket));
            }
            match js.create_key_value(config.clone()).await {
                Ok(kv) => return Ok(Store::with(kv, js, &bucket)),
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(StoreError::Open(last_error))
    }

    fn with(kv: kv::Store, js: &async_nats::jetstream::Context, bucket: &str) -> Store {
        Store {
            kv,
            js: js.clone(),
            stream: format!("KV_{bucket}"),
            applied: Arc::new(watch::channel(0).0),
        }
    }

    /// Writes `change`; returns its revision (not yet applied to any index).
    pub async fn put(&self, change: &Change) -> Result<u64, StoreError> {
        let (key, value) = encode_change(change);
        Ok(self.kv.put(key, value.into()).await?)
    }

    /// Writes `change` and waits until this router's index has applied it.
    pub async fn put_and_apply(&self, change: &Change) -> Result<(), StoreError> {
        let revision = self.put(change).await?;
        self.wait_applied(revision).await
    }

    /// The bucket's last revision, read now (one JetStream API request).
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        let stream = self
            .js
            .get_stream(self.stream.as_str())
            .await
            .map_err(|e| StoreError::Info(e.to_string()))?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Waits until the index has applied every change stored before this call.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let last = self.last_revision().await?;
        self.wait_applied(last).await
    }

    /// Waits (at most [`APPLY_WAIT`]) until the index has applied `revision`.
    pub async fn wait_applied(&self, revision: u64) -> Result<(), StoreError> {
        if *self.applied.borrow() >= revision {
            return Ok(());
        }
        let mut rx = self.applied.subscribe();
        let reached = matches!(
            tokio::time::timeout(APPLY_WAIT, rx.wait_for(|&a| a >= revision)).await,
            Ok(Ok(_))
        );
        match reached {
            true => Ok(()),
            false => {
                metrics::counter!("switchyard_router_store_behind_total").increment(1);
                Err(StoreError::Behind(revision))
            }
        }
    }

    /// The revision the index has applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Replays the bucket into `state`, then follows it until cancelled.
    /// Returns once the replay reached the revision that was last when it
    /// started, so a router serves nothing from a partial index.
    pub async fn start_watcher(
        &self,
        state: Arc<RouterState>,
        reconnects: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let target = self.last_revision().await?;
        let watch = self.kv.watch_with_history(">").await?;
        let store = self.clone();
        let handle = tokio::spawn(async move { store.follow(watch, state, reconnects, cancel).await });
        self.wait_applied(target).await?;
        Ok(handle)
    }

    async fn follow(
        &self,
        mut watch: kv::Watch,
        state: Arc<RouterState>,
        mut reconnects: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        reconnects.mark_unchanged();
        loop {
            let entry = tokio::select! {
                _ = cancel.cancelled() => return,
                // After a reconnect, follow from what was applied with a new watch.
                Ok(()) = reconnects.changed() => None,
                e = watch.next() => e,
            };
            match entry {
                Some(Ok(entry)) => {
                    let change = if matches!(entry.operation, Operation::Put) {
                        decode_change(&entry.key, &entry.value)
                    } else {
                        decode_change(&entry.key, &[])
                    };
                    match change {
                        Some(change) => state.apply_change(&change),
                        None => {
                            metrics::counter!("switchyard_router_store_undecodable_total").increment(1);
                            tracing::warn!(key = %entry.key, "undecodable entry in the subscription bucket skipped");
                        }
                    }
                    self.applied.send_modify(|a| *a = (*a).max(entry.revision));
                    metrics::gauge!("switchyard_router_subscriptions").set(state.subscription_count() as f64);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "subscription bucket watch error");
                }
                None => {
                    // The watch ended, or NATS reconnected: resume after what was applied.
                    let from = self.applied() + 1;
                    tracing::warn!(from, "subscription bucket watch ended; restarting");
                    loop {
                        if cancel.is_cancelled() {
                            return;
                        }
                        match self.kv.watch_all_from_revision(from).await {
                            Ok(w) => {
                                watch = w;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot restart the bucket watch");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Escapes a room name into one key token.
fn escape_room(room: &str) -> String {
    room.replace('.', "=2E").replace(':', "=3A")
}

fn unescape_room(token: &str) -> String {
    token.replace("=2E", ".").replace("=3A", ":")
}

/// The key and value that store `change`.
pub fn encode_change(change: &Change) -> (String, Vec<u8>) {
    match change {
        Change::Subscribe { user, sub } => (format!("s.{user}.{}", sub.name), control::encode(sub)),
        Change::Unsubscribe { user, name } => (format!("s.{user}.{name}"), Vec::new()),
        Change::Join { room, user } => (format!("r.{}.{user}", escape_room(room)), vec![1]),
        Change::Leave { room, user } => (format!("r.{}.{user}", escape_room(room)), Vec::new()),
    }
}

/// The change a key and value stand for (an empty value is a removal).
pub fn decode_change(key: &str, value: &[u8]) -> Option<Change> {
    let mut parts = key.splitn(3, '.');
    let (kind, a, b) = (parts.next()?, parts.next()?, parts.next()?);
    match (kind, value.is_empty()) {
        ("s", true) => Some(Change::Unsubscribe {
            user: a.to_string(),
            name: b.to_string(),
        }),
        ("s", false) => {
            let sub: Subscription = control::decode(value).ok()?;
            (sub.name == b).then(|| Change::Subscribe {
                user: a.to_string(),
                sub,
            })
        }
        ("r", true) => Some(Change::Leave {
            room: unescape_room(a),
            user: b.to_string(),
        }),
        ("r", false) => Some(Change::Join {
            room: unescape_room(a),
            user: b.to_string(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sub(name: &str) -> Subscription {
        Subscription {
            name: name.into(),
            sub_type: "tick".into(),
            filters: BTreeMap::from([("symbol".to_string(), vec!["AAPL".to_string()])]),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: None,
        }
    }

    #[test]
    fn every_change_round_trips_through_its_key_and_value() {
        let changes = [
            Change::Subscribe {
                user: "alice".into(),
                sub: sub("s-1"),
            },
            Change::Unsubscribe {
                user: "alice".into(),
                name: "s-1".into(),
            },
            Change::Join {
                room: "desk:fx.eu-1".into(),
                user: "bob_2".into(),
            },
            Change::Leave {
                room: "lobby".into(),
                user: "bob_2".into(),
            },
        ];
        for c in changes {
            let (key, value) = encode_change(&c);
            assert!(
                key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)),
                "{key} is not a valid KV key"
            );
            assert_eq!(decode_change(&key, &value), Some(c));
        }
    }

    #[test]
    fn hostile_entries_decode_to_nothing() {
        assert_eq!(decode_change("s.alice", b"x"), None);
        assert_eq!(decode_change("x.a.b", b""), None);
        assert_eq!(decode_change("s.alice.s1", b"\xc1garbage"), None);
        // A value whose name disagrees with its key is not trusted.
        let (_, value) = encode_change(&Change::Subscribe {
            user: "alice".into(),
            sub: sub("other"),
        });
        assert_eq!(decode_change("s.alice.s1", &value), None);
    }
}
