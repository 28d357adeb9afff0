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
//! docs/PROTOCOL.md promises that `ok` to a change holds for every event
//! published after it, whichever router matches the event. The writer
//! answers `ok` only after the bucket stored the change; an event published
//! later is fetched later. Before matching a batch of events, a router calls
//! [`Store::catch_up`], which reads the bucket's last sequence (one
//! JetStream API request, made after the batch was fetched) and waits until
//! its watcher has applied at least that revision. The watcher sees every
//! message while it exists; the only messages that ever leave the bucket
//! other than by being overwritten are expired removal records (below), and
//! a (re)build that finds the last sequence gone counts it as applied.
//!
//! # Keys
//! `s.<user>.<subscription>` holds the normalized subscription
//! (MessagePack); `r.<room>.<user>` marks a membership, with `.` and `:` in
//! room names escaped as `=2E` and `=3A` (key tokens allow `=`, never `:`).
//! A removal is written as an empty value (a tombstone) rather than a
//! delete, so the write returns the revision that the writer then waits for.
//!
//! # Bounds on what a user can make the bucket hold
//! - Per-user caps (subscriptions, rooms) are exact across routers: an
//!   addition is written with `Nats-Expected-Last-Subject-Sequence` checked
//!   against the user's key filter (`s.<user>.*` or `r.*.<user>`,
//!   `Nats-Expected-Last-Subject-Sequence-Subject`). The writer reads the
//!   filter's last sequence, waits until its index has applied it, counts,
//!   and writes only if no change to that user's keys landed in between;
//!   otherwise it reads and counts again ([`Store::write`] returns
//!   [`StoreError::Conflict`]). Two routers can never both add the last slot.
//! - A removal of a name that is not there writes nothing ([`Store::is_present`]
//!   asks the stream leader, so an `ok` just given by another router is seen).
//! - The bucket has a `max_bytes` (`SWITCHYARD_SUBS_MAX_BYTES`).
//!
//! # Purging removal records, and why it is safe for watchers
//! Tombstones carry a per-message TTL (`Nats-TTL`,
//! `SWITCHYARD_SUBS_TOMBSTONE_TTL_S`, default 1 h), so the server deletes
//! them itself: no router runs a purge, so routers never race one another
//! over it and nothing depends on which router is alive. A tombstone is
//! needed only by a watcher that has not applied it yet; a fresh replay
//! (a router starting, or rebuilding) does not need it, since a key that is
//! absent is simply not subscribed. So a watcher may follow on from its last
//! applied revision only while it cannot have missed an expiry: it records
//! when it last knew it had applied everything in the bucket (a
//! [`Store::catch_up`], an entry with nothing pending, or its own periodic
//! check) and, once that is three quarters of the TTL ago (after a long
//! disconnection, or lagging that long), it rebuilds its index from a fresh
//! replay off to the side and swaps it in ([`may_follow_on`]). That costs a
//! second index in memory for the length of the replay, and happens only
//! after an outage longer than most of the TTL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation};
use async_nats::HeaderMap;
use futures::StreamExt;
use switchyard_common::subject::Subjects;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::change::{decode_change, encode_change, Change};
use crate::state::{Replica, RouterState};

/// How long a caller waits for the watcher to apply a revision, and how long
/// a replay may go without progress.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Settings of the subscription bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Replicas (3 on a NATS cluster).
    pub replicas: usize,
    /// File (default) or memory storage.
    pub storage: switchyard_runtime::nats::Storage,
    /// Largest size of the bucket, in bytes (default 1 GiB).
    pub max_bytes: i64,
    /// How long a tombstone stays before the server deletes it (default 1 h).
    pub tombstone_ttl: Duration,
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bucket could not be created or opened.
    #[error("cannot open the subscription bucket")]
    Open(#[from] switchyard_runtime::nats::KvOpenError),
    /// The bucket's limits could not be brought to the settings.
    #[error("cannot set the subscription bucket's limits")]
    Limits(#[source] LimitsError),
    /// A write failed.
    #[error("cannot store the change: {0}")]
    Put(#[from] async_nats::jetstream::context::PublishError),
    /// A guarded write found another change to the same user's keys first.
    #[error("another change to this user's keys came first")]
    Conflict,
    /// The bucket reached its `max_bytes`.
    #[error("the subscription bucket is full (SWITCHYARD_SUBS_MAX_BYTES)")]
    Full,
    /// The last revision of a key could not be read.
    #[error("cannot read the subscription bucket's state")]
    Read(#[from] async_nats::jetstream::stream::LastRawMessageError),
    /// The bucket's stream could not be looked up.
    #[error("cannot look up the subscription bucket's stream")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// The watcher did not apply the revision in time.
    #[error("the subscription index is behind the bucket (revision {0} not applied in time)")]
    Behind(u64),
    /// The watcher could not be started.
    #[error("cannot watch the subscription bucket: {0}")]
    Watch(#[from] kv::WatchError),
}

/// Why the bucket's limits could not be set.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// The bucket's stream could not be found.
    #[error("cannot find the bucket's stream")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// The stream's configuration could not be read.
    #[error("cannot read the bucket's stream configuration")]
    Info(#[from] async_nats::jetstream::context::RequestError),
    /// The stream's configuration could not be updated.
    #[error("cannot update the bucket's stream configuration")]
    Update(#[from] async_nats::jetstream::context::UpdateStreamError),
    /// The server is too old for tombstones that expire.
    #[error("the NATS server does not support per-message TTLs (nats-server 2.11 or later is needed)")]
    NoMessageTtl,
}

/// Tries of [`Store::open`] at setting the bucket's limits before it gives up.
const OPEN_TRIES: usize = 5;

/// Whether a watcher that last knew it had applied the whole bucket `since`
/// ago may follow on from its last applied revision: only while no
/// tombstone it has not seen can have expired yet (with a quarter of the
/// TTL to spare for clocks and latency); otherwise it must rebuild.
pub fn may_follow_on(since: Duration, tombstone_ttl: Duration) -> bool {
    since < tombstone_ttl - tombstone_ttl / 4
}

/// Classifies a failed write: a lost guard, a full bucket, or anything else.
fn classify(e: async_nats::jetstream::context::PublishError) -> StoreError {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::ErrorCode;
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return StoreError::Conflict;
    }
    let code = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(|j| j.error_code());
    match code {
        // A clustered leader refuses, without comparing, while another
        // guarded write to the same filter is in flight: try again.
        Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) => StoreError::Conflict,
        Some(ErrorCode::STREAM_STORE_FAILED) if e.to_string().contains("maximum bytes") => StoreError::Full,
        _ => StoreError::Put(e),
    }
}

/// The subscription bucket and the revision this router's index has applied.
#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
    js: async_nats::jetstream::Context,
    stream: String,
    tombstone_ttl: Duration,
    applied: Arc<watch::Sender<u64>>,
    /// When (ms after `epoch`) the watcher last knew it had applied everything.
    caught_up_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Store {
    /// Opens the bucket, creating it when missing (several routers may race
    /// to create it), and brings its limits to `settings` (`max_bytes`,
    /// per-message TTLs), also on a bucket made by an older version.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        subjects: &Subjects,
        settings: &StoreSettings,
    ) -> Result<Store, StoreError> {
        let bucket = subjects.store_bucket();
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "Switchyard subscriptions and room memberships".into(),
            history: 1,
            num_replicas: settings.replicas,
            max_bytes: settings.max_bytes,
            storage: settings.storage.into(),
            ..Default::default()
        };
        let mut tries = 0;
        loop {
            let kv = switchyard_runtime::nats::open_or_create_kv(js, &config).await?;
            let store = Store::with(kv, js, &bucket, settings);
            match store.ensure_limits(settings).await {
                Ok(()) => return Ok(store),
                Err(e) if tries + 1 >= OPEN_TRIES => return Err(StoreError::Limits(e)),
                Err(e) => tracing::debug!(error = %e, "subscription bucket limits not set yet; trying again"),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn with(kv: kv::Store, js: &async_nats::jetstream::Context, bucket: &str, settings: &StoreSettings) -> Store {
        Store {
            kv,
            js: js.clone(),
            stream: format!("KV_{bucket}"),
            tombstone_ttl: settings.tombstone_ttl,
            applied: Arc::new(watch::channel(0).0),
            caught_up_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    /// Sets `max_bytes` and turns per-message TTLs on when the stream lacks them.
    async fn ensure_limits(&self, settings: &StoreSettings) -> Result<(), LimitsError> {
        let mut stream = self.js.get_stream(self.stream.as_str()).await?;
        let mut config = stream.info().await?.config.clone();
        if config.max_bytes == settings.max_bytes && config.allow_message_ttl {
            return Ok(());
        }
        config.max_bytes = settings.max_bytes;
        config.allow_message_ttl = true;
        let info = self.js.update_stream(config).await?;
        if !info.config.allow_message_ttl {
            return Err(LimitsError::NoMessageTtl);
        }
        tracing::info!(max_bytes = settings.max_bytes, "subscription bucket limits updated");
        Ok(())
    }

    /// The subject of a key (or key filter) in the bucket.
    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix))
    }

    /// Writes `change`; returns its revision (not yet applied to any index).
    ///
    /// With `guard`, the write happens only if the last revision among the
    /// change's user's keys of its kind ([`Change::user_filter`]) is still
    /// `guard` (0: none), and fails with [`StoreError::Conflict`] otherwise.
    /// A removal is a tombstone that the server deletes after the TTL.
    pub async fn write(&self, change: &Change, guard: Option<u64>) -> Result<u64, StoreError> {
        let (key, value) = encode_change(change);
        let mut headers = HeaderMap::new();
        if let Some(seen) = guard {
            headers.insert("Nats-Expected-Last-Subject-Sequence", seen.to_string().as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                self.subject(&change.user_filter()).as_str(),
            );
        }
        if change.is_removal() {
            headers.insert("Nats-TTL", format!("{}s", self.tombstone_ttl.as_secs().max(1)).as_str());
        }
        let ack = self
            .js
            .publish_with_headers(self.subject(&key), headers, value.into())
            .await
            .map_err(classify)?
            .await
            .map_err(classify)?;
        Ok(ack.sequence)
    }

    /// The last revision among the keys [`Change::user_filter`] names (0:
    /// none), read from the stream leader: what a guarded write of `change` expects.
    pub async fn user_revision(&self, change: &Change) -> Result<u64, StoreError> {
        self.last_sequence_of(&change.user_filter()).await
    }

    /// The sequence of the last message whose subject matches `filter` (0: none).
    async fn last_sequence_of(&self, filter: &str) -> Result<u64, StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&self.subject(filter))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(StoreError::Read(e)),
        }
    }

    /// Whether what `change` would remove is there now (asked of the stream
    /// leader, not of any index, so it sees every change already answered `ok`).
    pub async fn is_present(&self, change: &Change) -> Result<bool, StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let (key, _) = encode_change(change);
        match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&self.subject(&key))
            .await
        {
            Ok(m) => Ok(!m.payload.is_empty() && m.headers.get("KV-Operation").is_none()),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(StoreError::Read(e)),
        }
    }

    /// The bucket's last revision, read now (one JetStream API request).
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        let stream = self.js.get_stream(self.stream.as_str()).await?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Waits until the index has applied every change stored before this call.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let asked = Instant::now();
        let last = self.last_revision().await?;
        self.wait_applied(last).await?;
        self.note_caught_up(asked);
        Ok(())
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

    /// Records that at `at` the watcher had applied everything in the bucket.
    fn note_caught_up(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.caught_up_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long ago the watcher last knew it had applied everything.
    fn since_caught_up(&self) -> Duration {
        let at = self.epoch + Duration::from_millis(self.caught_up_ms.load(Ordering::Relaxed));
        at.elapsed()
    }

    /// Replays the bucket into `state`, then follows it until cancelled.
    /// Returns once the replay is complete, so a router serves nothing from
    /// a partial index.
    pub async fn start_watcher(
        &self,
        state: Arc<RouterState>,
        reconnects: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let watch = self.rebuild(&state).await?;
        let store = self.clone();
        Ok(tokio::spawn(async move {
            store.follow(watch, state, reconnects, cancel).await
        }))
    }

    /// Replays the whole bucket into a fresh index off to the side, swaps it
    /// into `state`, and returns the watch to follow on with.
    async fn rebuild(&self, state: &RouterState) -> Result<kv::Watch, StoreError> {
        let asked = Instant::now();
        let last = self.last_revision().await?;
        let mut watch = self.kv.watch_with_history(">").await?;
        // Read after the watch started: every message up to `target` is in
        // its replay or follows it; those up to `last` past `target` are gone.
        let target = self.last_sequence_of(">").await?;
        let mut replica = Replica::new();
        let mut reached = 0;
        while reached < target {
            match tokio::time::timeout(APPLY_WAIT, watch.next()).await {
                Ok(Some(Ok(entry))) => {
                    apply_entry(&entry, |c| replica.apply(c));
                    reached = reached.max(entry.revision);
                }
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "subscription bucket watch error during replay"),
                Ok(None) | Err(_) => return Err(StoreError::Behind(target)),
            }
        }
        state.install(replica);
        self.applied.send_modify(|a| *a = (*a).max(reached).max(last));
        self.note_caught_up(asked);
        metrics::gauge!("switchyard_router_subscriptions").set(state.subscription_count() as f64);
        Ok(watch)
    }

    async fn follow(
        &self,
        mut watch: kv::Watch,
        state: Arc<RouterState>,
        mut reconnects: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        reconnects.mark_unchanged();
        // Often enough that an idle but healthy watcher never looks stale.
        let mut check = tokio::time::interval((self.tombstone_ttl / 8).max(Duration::from_millis(100)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let entry = tokio::select! {
                _ = cancel.cancelled() => return,
                // After a reconnect, follow from what was applied with a new watch.
                Ok(()) = reconnects.changed() => None,
                _ = check.tick() => {
                    let asked = Instant::now();
                    match self.last_revision().await {
                        Ok(last) if self.applied() >= last => self.note_caught_up(asked),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "cannot read the subscription bucket's state"),
                    }
                    if !may_follow_on(self.since_caught_up(), self.tombstone_ttl) {
                        let Some(w) = self.rebuild_until_done(&state, &cancel, "watcher lagging").await else {
                            return;
                        };
                        watch = w;
                    }
                    continue;
                }
                e = watch.next() => e,
            };
            match entry {
                Some(Ok(entry)) => {
                    if !may_follow_on(self.since_caught_up(), self.tombstone_ttl) {
                        // Removal records may have expired before reaching us.
                        let Some(w) = self.rebuild_until_done(&state, &cancel, "watcher lagging").await else {
                            return;
                        };
                        watch = w;
                        continue;
                    }
                    apply_entry(&entry, |c| state.apply_change(c));
                    self.applied.send_modify(|a| *a = (*a).max(entry.revision));
                    if entry.delta == 0 {
                        self.note_caught_up(Instant::now());
                    }
                    metrics::gauge!("switchyard_router_subscriptions").set(state.subscription_count() as f64);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "subscription bucket watch error");
                }
                None if !may_follow_on(self.since_caught_up(), self.tombstone_ttl) => {
                    let Some(w) = self
                        .rebuild_until_done(&state, &cancel, "watch was down too long")
                        .await
                    else {
                        return;
                    };
                    watch = w;
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

    /// Rebuilds the index (see [`Store::rebuild`]), retrying until it
    /// succeeds (the old index serves meanwhile); `None` when the router stops first.
    async fn rebuild_until_done(
        &self,
        state: &RouterState,
        cancel: &CancellationToken,
        why: &str,
    ) -> Option<kv::Watch> {
        metrics::counter!("switchyard_router_store_rebuilds_total").increment(1);
        tracing::warn!(reason = why, "rebuilding the subscription index from the bucket");
        loop {
            match self.rebuild(state).await {
                Ok(w) => return Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot rebuild the subscription index; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}

/// Decodes one bucket entry and hands the change to `apply` (undecodable
/// entries are counted and skipped).
fn apply_entry(entry: &kv::Entry, apply: impl FnOnce(&Change)) {
    let change = if matches!(entry.operation, Operation::Put) {
        decode_change(&entry.key, &entry.value)
    } else {
        decode_change(&entry.key, &[])
    };
    match change {
        Some(change) => apply(&change),
        None => {
            metrics::counter!("switchyard_router_store_undecodable_total").increment(1);
            tracing::warn!(key = %entry.key, "undecodable entry in the subscription bucket skipped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use switchyard_common::subscription::Subscription;

    fn sub(name: &str) -> Subscription {
        Subscription {
            name: name.into(),
            sub_type: "tick".into(),
            filters: BTreeMap::from([("symbol".to_string(), vec!["AAPL".to_string()])]),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: None,
            throttle_ms: None,
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

    #[test]
    fn a_users_key_filter_covers_exactly_their_keys_of_that_kind() {
        let changes = [
            Change::Subscribe {
                user: "alice".into(),
                sub: sub("s-1"),
            },
            Change::Unsubscribe {
                user: "alice".into(),
                name: "s-2".into(),
            },
            Change::Join {
                room: "desk:fx.eu-1".into(),
                user: "alice".into(),
            },
            Change::Leave {
                room: "lobby".into(),
                user: "alice".into(),
            },
        ];
        // NATS subject matching: `*` is exactly one token.
        let matches = |filter: &str, key: &str| {
            let (f, k): (Vec<_>, Vec<_>) = (filter.split('.').collect(), key.split('.').collect());
            f.len() == k.len() && f.iter().zip(&k).all(|(f, k)| *f == "*" || f == k)
        };
        for c in &changes {
            let (key, _) = encode_change(c);
            assert!(matches(&c.user_filter(), &key), "{key} outside {}", c.user_filter());
            for other in &changes {
                let same_kind = c.user_filter() == other.user_filter();
                assert_eq!(
                    matches(&other.user_filter(), &key),
                    same_kind,
                    "{key} / {}",
                    other.user_filter()
                );
            }
            let (bob_key, _) = encode_change(&match c.clone() {
                Change::Subscribe { sub, .. } => Change::Subscribe {
                    user: "bob".into(),
                    sub,
                },
                Change::Unsubscribe { name, .. } => Change::Unsubscribe {
                    user: "bob".into(),
                    name,
                },
                Change::Join { room, .. } => Change::Join {
                    room,
                    user: "bob".into(),
                },
                Change::Leave { room, .. } => Change::Leave {
                    room,
                    user: "bob".into(),
                },
            });
            assert!(
                !matches(&c.user_filter(), &bob_key),
                "another user's key {bob_key} counted"
            );
        }
        assert!(!changes[0].is_removal() && changes[1].is_removal());
        assert!(!changes[2].is_removal() && changes[3].is_removal());
    }

    #[test]
    fn a_watcher_follows_on_only_while_no_unseen_tombstone_can_have_expired() {
        let ttl = Duration::from_secs(3600);
        assert!(may_follow_on(Duration::ZERO, ttl));
        assert!(may_follow_on(Duration::from_secs(2699), ttl));
        assert!(
            !may_follow_on(Duration::from_secs(2700), ttl),
            "a quarter of the TTL is kept in hand"
        );
        assert!(!may_follow_on(Duration::from_secs(86_400), ttl));
        let ttl = Duration::from_secs(1);
        assert!(may_follow_on(Duration::from_millis(700), ttl));
        assert!(!may_follow_on(Duration::from_millis(750), ttl));
    }
}
