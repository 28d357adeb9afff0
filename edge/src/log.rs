//! The edge's view of the delivery log: replaying a user's durable events
//! after a position, and deciding whether a resume is `recovered`, with
//! as little work for NATS as a resume allows.
//!
//! The router tier owns the log streams (see `switchyard_router::log`); the
//! edge only reads them. A user's durable history is the merge, by stream
//! sequence, of the user's subject and the broadcast subject of the user's
//! partition, both in one stream and written by one router at a time.
//! Replay reads each subject with direct gets (`next_by_subj`: the next
//! message on a subject from a sequence, found through the store's
//! per-subject index, stateless on the server) and merges them by
//! sequence: one request per missed event plus one per subject to find
//! the end. Batched direct gets (2.11+) would make that two requests, but
//! nats-server counts what is left on the subject for every batch, and in
//! the storm benchmark that cost it three times the CPU
//! (docs/BENCHMARKS.md, "Reconnect storms").
//!
//! `recovered` comes from the same reads plus the stream's state read
//! *after* them ([`StateCache`]): if the stream's first sequence is still at
//! or below `since + 1`, nothing was evicted from the front; and a subject
//! is counted exactly (one more request) only when what the resume saw of
//! it comes near the per-subject limit. Resumes that finish their reads at
//! the same moment share one stream-info request, so a storm costs NATS a
//! handful of those per round, not one per client.
//!
//! Where the user's log is and its `epoch` come with the user's
//! registration ([`crate::intake::Registration`]). Requires the streams'
//! `allow_direct`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::TryStreamExt;
use switchyard_common::subject::Subjects;
use tokio::sync::watch;

use crate::broadcasts::{Broadcasts, Lookup};
use crate::conn::{ConnHandle, Delivery};
use crate::intake::Registration;

/// How long one read of a replay may take before the replay fails.
const REPLAY_STALL: Duration = Duration::from_secs(10);

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The stream does not exist (no router has created it yet).
    #[error("delivery log stream {0} not found; is a router running?")]
    Missing(String),
    /// A JetStream request failed.
    #[error("delivery log request failed")]
    Request(#[source] RequestFailure),
    /// The replay stalled.
    #[error("delivery log replay timed out")]
    Timeout,
}

/// The request behind [`LogError::Request`], with its cause.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    /// Looking up a log stream.
    #[error("stream lookup")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// Reading a subject's message count.
    #[error("stream info")]
    Info(#[from] async_nats::jetstream::stream::InfoError),
    /// A direct get of a message.
    #[error("direct get")]
    DirectGet(#[from] async_nats::jetstream::stream::DirectGetError),
}

fn request_error(e: impl Into<RequestFailure>) -> LogError {
    LogError::Request(e.into())
}

/// What the `recovered` check needs of a log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// The last sequence stored (0 when empty).
    pub last_seq: u64,
    /// The first sequence still stored.
    pub first_seq: u64,
    /// Messages kept per subject (0 or less: no limit).
    pub max_per_subject: i64,
}

/// The two subjects of one user's history.
#[derive(Debug, Clone)]
pub struct UserLog {
    /// The log's epoch (sequences are comparable only within one).
    pub epoch: String,
    /// The stream holding them.
    pub stream: String,
    /// The user's own subject and the partition's broadcast subject.
    pub subjects: [String; 2],
}

/// What a replay sent, and what it saw for the `recovered` check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Events sent.
    pub count: u64,
    /// The last position sent (or the start position when none).
    pub last_pos: u64,
    /// Per subject: messages read with a position after `since`.
    pub after_since: [u64; 2],
}

/// Read access to the delivery log streams.
pub struct DeliveryLog {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    partitions: u32,
    states: StateCache,
    /// What resumes already read of the broadcast subjects, shared.
    broadcasts: Mutex<Broadcasts>,
}

impl DeliveryLog {
    /// Finds the first log stream, waiting up to `wait` for a router to create it.
    pub async fn open(
        js: async_nats::jetstream::Context,
        subjects: Subjects,
        partitions: u32,
        wait: Duration,
    ) -> Result<DeliveryLog, LogError> {
        let name = subjects.log_stream(0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match js.get_stream(&name).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::error!(error = %e, stream = %name, "delivery log not available");
                    return Err(LogError::Missing(name));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(DeliveryLog {
            states: StateCache::new(js.clone()),
            broadcasts: Mutex::new(Broadcasts::default()),
            js,
            subjects,
            partitions,
        })
    }

    /// Where `user`'s history is, given their registration.
    pub fn user_log(&self, user: &str, reg: &Registration) -> UserLog {
        let p = switchyard_common::fanout::user_partition(user, self.partitions);
        UserLog {
            epoch: reg.epoch.clone(),
            stream: reg.stream.clone(),
            subjects: [self.subjects.deliver(p, user), self.subjects.deliver_all(p)],
        }
    }

    /// The stream's state as of some moment after this call began (shared
    /// with every other caller waiting at the same time).
    pub async fn state(&self, log: &UserLog) -> Result<LogState, LogError> {
        self.states.after_now(&log.stream).await
    }

    /// Whether nothing durable for the user after `since` was evicted
    /// before `replayed`'s reads (which must be done; `upto` is the
    /// registration's `pos`; `held` counts the user's durable deliveries
    /// that came live meanwhile). Conservative: may say false when nothing
    /// was lost, never true when something was.
    pub async fn recovered(
        &self,
        log: &UserLog,
        since: u64,
        upto: u64,
        replayed: &Replayed,
        held: u64,
    ) -> Result<bool, LogError> {
        if since > upto {
            return Ok(false);
        }
        let state = self.state(log).await?;
        if !recovered_from(&state, since, replayed) {
            return Ok(false);
        }
        // The per-subject limit: a subject is full only if it holds the
        // limit's worth of messages after `since`. Those are what the
        // replay read, what came live since the registration (`held`), and
        // what is stored but still on its way to this edge (milliseconds of
        // deliveries, far below half the limit). Counted exactly, one
        // request, only when it could be close.
        let limit = state.max_per_subject;
        if limit > 0 {
            let stream = self.handle(log).await?;
            for (subject, &read) in log.subjects.iter().zip(&replayed.after_since) {
                if (read + held) * 2 < limit as u64 {
                    continue;
                }
                metrics::counter!("switchyard_edge_log_requests_total", "kind" => "subject_count").increment(1);
                let mut counts = stream.info_with_subjects(subject).await.map_err(request_error)?;
                let mut count = 0u64;
                while let Some((_, n)) = counts.try_next().await.map_err(request_error)? {
                    count += n as u64;
                }
                if count >= limit as u64 {
                    let first = stream
                        .direct_get_first_for_subject(subject.as_str())
                        .await
                        .map_err(request_error)?;
                    if first.sequence > since.saturating_add(1) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// A handle on the user's log stream (no request: direct gets need only its name).
    async fn handle(&self, log: &UserLog) -> Result<Stream<()>, LogError> {
        self.js.get_stream_no_info(&log.stream).await.map_err(request_error)
    }

    /// The first message on `subject` from sequence `from` on (`None`:
    /// not found, on the replica that answered).
    async fn next_on(stream: &Stream<()>, subject: &str, from: u64) -> Result<Option<(u64, bytes::Bytes)>, LogError> {
        let get = stream.direct_get_next_for_subject(subject, Some(from));
        match tokio::time::timeout(REPLAY_STALL, get).await {
            Err(_) => Err(LogError::Timeout),
            Ok(Ok(m)) => Ok(Some((m.sequence, m.payload))),
            Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(request_error(e)),
        }
    }

    /// The first message of the user's own subject in `from..=upto`.
    async fn next_user(
        &self,
        stream: &Stream<()>,
        subject: &str,
        from: u64,
        upto: u64,
    ) -> Result<Option<(u64, bytes::Bytes)>, LogError> {
        if from > upto {
            return Ok(None);
        }
        metrics::counter!("switchyard_edge_log_requests_total", "kind" => "direct_get").increment(1);
        Ok(Self::next_on(stream, subject, from)
            .await?
            .filter(|(seq, _)| *seq <= upto))
    }

    /// The first message of the partition's broadcast subject in
    /// `after + 1 ..= upto`, from what earlier resumes read when they
    /// already did (see [`crate::broadcasts`]).
    async fn next_broadcast(
        &self,
        stream: &Stream<()>,
        log: &UserLog,
        after: u64,
        upto: u64,
    ) -> Result<Option<(u64, bytes::Bytes)>, LogError> {
        let subject = &log.subjects[1];
        let lookup = self
            .broadcasts
            .lock()
            .expect("broadcasts lock")
            .range(&log.epoch, subject)
            .next(after, upto);
        // Reading from past the known range is enough: what lies between
        // `after` and it is known to hold nothing.
        let from = match lookup {
            Lookup::Known(m) => return Ok(m),
            Lookup::ReadFrom(from) if from > upto => return Ok(None),
            Lookup::ReadFrom(from) => from,
        };
        metrics::counter!("switchyard_edge_log_requests_total", "kind" => "direct_get_broadcast").increment(1);
        let found = Self::next_on(stream, subject, from).await?;
        // Only a message found is learned: "not found" may come from a
        // lagging replica and proves nothing for later readers.
        if let Some(m) = &found {
            self.broadcasts
                .lock()
                .expect("broadcasts lock")
                .range(&log.epoch, subject)
                .learn(from, m.clone());
        }
        Ok(found.filter(|(seq, _)| *seq <= upto))
    }

    /// Sends the user's durable events with `after < pos <= upto`, in order,
    /// into the connection's data queue (waiting for room: the writer paces
    /// it), and counts per subject those after `since` (at least `after`).
    pub async fn replay(
        &self,
        log: &UserLog,
        after: u64,
        since: u64,
        upto: u64,
        out: &ConnHandle,
    ) -> Result<Replayed, LogError> {
        let mut done = Replayed {
            count: 0,
            last_pos: after,
            after_since: [0, 0],
        };
        if upto <= after {
            return Ok(done);
        }
        let stream = self.handle(log).await?;
        let subjects = &log.subjects;
        // Both subjects' first reads go out at once.
        let (a, b) = tokio::join!(
            self.next_user(&stream, &subjects[0], after + 1, upto),
            self.next_broadcast(&stream, log, after, upto)
        );
        let mut heads = [a?, b?];
        loop {
            let i = match (&heads[0], &heads[1]) {
                (Some(a), Some(b)) => usize::from(b.0 < a.0),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (None, None) => break,
            };
            let Some((seq, payload)) = heads[i].take() else { break };
            if !out.replayed(Delivery::new(payload, Some(seq), true)).await {
                break;
            }
            done.count += 1;
            done.last_pos = seq;
            if seq > since {
                done.after_since[i] += 1;
            }
            heads[i] = if i == 0 {
                self.next_user(&stream, &subjects[0], seq + 1, upto).await?
            } else {
                self.next_broadcast(&stream, log, seq, upto).await?
            };
        }
        metrics::counter!("switchyard_edge_replayed_total").increment(done.count);
        Ok(done)
    }
}

/// Whether `replayed` (reads done before `state` was read) saw everything
/// stored after `since` that the stream's front (age and size limits) and
/// the subjects it read in full can tell. Pure, for tests.
pub fn recovered_from(state: &LogState, since: u64, replayed: &Replayed) -> bool {
    // Age and size limits evict from the front of the whole stream.
    if state.first_seq > since.saturating_add(1) {
        return false;
    }
    // A per-subject limit evicts a subject's oldest first: a subject read
    // with as many messages after `since` as the limit may have lost older ones.
    state.max_per_subject <= 0 || replayed.after_since.iter().all(|&n| n < state.max_per_subject as u64)
}

/// Log stream states, read at most once per round however many resumes
/// ask at the same time.
struct StateCache {
    js: async_nats::jetstream::Context,
    streams: Mutex<HashMap<String, Arc<StateSlot>>>,
}

/// One stream's latest state, with when its request was sent.
struct StateSlot {
    latest: watch::Sender<Option<(Instant, LogState)>>,
    fetching: AtomicBool,
}

/// Clears [`StateSlot::fetching`] and wakes the waiters however the fetch
/// ends (done, failed, or its resume dropped), so one of them takes over.
struct Fetching<'a>(&'a StateSlot);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.fetching.store(false, Ordering::Release);
        self.0.latest.send_modify(|_| {});
    }
}

impl StateCache {
    fn new(js: async_nats::jetstream::Context) -> StateCache {
        StateCache {
            js,
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, stream: &str) -> Arc<StateSlot> {
        self.streams
            .lock()
            .expect("state cache lock")
            .entry(stream.to_string())
            .or_insert_with(|| {
                Arc::new(StateSlot {
                    latest: watch::channel(None).0,
                    fetching: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// A state read by a request sent after this call began: either one
    /// already on its way that started after us, or one we send.
    async fn after_now(&self, stream: &str) -> Result<LogState, LogError> {
        let asked = Instant::now();
        let slot = self.slot(stream);
        let mut rx = slot.latest.subscribe();
        let mut waits = 0;
        loop {
            if let Some((at, state)) = rx.borrow_and_update().as_ref() {
                if *at >= asked {
                    return Ok(state.clone());
                }
            }
            if !slot.fetching.swap(true, Ordering::AcqRel) {
                let _fetching = Fetching(&slot);
                let sent = Instant::now();
                let state = self.fetch(stream).await?;
                slot.latest.send_replace(Some((sent, state.clone())));
                return Ok(state);
            }
            // Someone else's request is on its way; if it started before us,
            // failed or was dropped, we go round again and send the next one.
            if tokio::time::timeout(REPLAY_STALL, rx.changed()).await.is_err() {
                waits += 1;
                if waits >= 3 {
                    return Err(LogError::Timeout);
                }
            }
        }
    }

    async fn fetch(&self, stream: &str) -> Result<LogState, LogError> {
        metrics::counter!("switchyard_edge_log_requests_total", "kind" => "stream_info").increment(1);
        let stream_handle = self.js.get_stream(stream).await.map_err(|e| match e.kind() {
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(_) => LogError::Missing(stream.to_string()),
            _ => request_error(e),
        })?;
        let info = stream_handle.cached_info();
        Ok(LogState {
            last_seq: info.state.last_sequence,
            first_seq: info.state.first_sequence,
            max_per_subject: info.config.max_messages_per_subject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(first_seq: u64, max_per_subject: i64) -> LogState {
        LogState {
            last_seq: 100,
            first_seq,
            max_per_subject,
        }
    }

    fn replayed(after_since: [u64; 2]) -> Replayed {
        Replayed {
            count: 0,
            last_pos: 0,
            after_since,
        }
    }

    #[test]
    fn recovered_only_when_nothing_after_since_can_have_been_evicted() {
        assert!(recovered_from(&state(1, 0), 0, &replayed([5, 0])));
        assert!(
            recovered_from(&state(11, 0), 10, &replayed([5, 0])),
            "the first kept is since + 1"
        );
        assert!(
            !recovered_from(&state(12, 0), 10, &replayed([5, 0])),
            "since + 1 was evicted"
        );
        assert!(recovered_from(&state(1, 10), 0, &replayed([9, 9])));
        assert!(
            !recovered_from(&state(1, 10), 0, &replayed([10, 0])),
            "a full subject may have lost its oldest"
        );
        assert!(
            !recovered_from(&state(1, 10), 0, &replayed([0, 10])),
            "the broadcast subject too"
        );
    }
}
