//! The edge's view of the delivery log: replaying a user's durable events
//! after a position, and deciding whether a resume is `recovered`.
//!
//! The router tier owns the log streams (see `switchyard_router::log`); the
//! edge only reads them. A user's durable history is the merge, by stream
//! sequence, of the user's subject and the broadcast subject of the user's
//! partition, both in one stream and written by one router at a time;
//! replay reads each with direct gets (`next_by_subj`, stateless on the
//! server) and merges them in that order. Where the user's log is and its
//! `epoch` come with the user's registration ([`crate::intake::Registration`]).
//! Requires the streams' `allow_direct`.

use std::time::Duration;

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::TryStreamExt;
use switchyard_common::subject::Subjects;

use crate::conn::{ConnHandle, Delivery};
use crate::intake::Registration;

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

/// The JetStream request behind [`LogError::Request`], with its cause.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    /// Looking up a log stream.
    #[error("stream lookup")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// Reading a stream's info (per-subject counts).
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
    /// Messages kept per subject.
    pub max_per_subject: i64,
}

/// The two subjects of one user's history.
#[derive(Debug, Clone)]
pub struct UserLog {
    /// The stream holding them.
    pub stream: String,
    /// The user's own subject and the partition's broadcast subject.
    pub subjects: [String; 2],
}

/// What a replay sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Events sent.
    pub count: u64,
    /// The last position sent (or the start position when none).
    pub last_pos: u64,
}

/// Read access to the delivery log streams.
pub struct DeliveryLog {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    partitions: u32,
}

/// How long one replayed message may take to arrive before the replay fails.
const REPLAY_STALL: Duration = Duration::from_secs(10);

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
                Ok(_) => {
                    return Ok(DeliveryLog {
                        js,
                        subjects,
                        partitions,
                    })
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::error!(error = %e, stream = %name, "delivery log not available");
                    return Err(LogError::Missing(name));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Where `user`'s history is, given their registration.
    pub fn user_log(&self, user: &str, reg: &Registration) -> UserLog {
        let p = switchyard_common::fanout::user_partition(user, self.partitions);
        UserLog {
            stream: reg.stream.clone(),
            subjects: [self.subjects.deliver(p, user), self.subjects.deliver_all(p)],
        }
    }

    async fn stream(&self, name: &str) -> Result<Stream, LogError> {
        self.js.get_stream(name).await.map_err(|e| match e.kind() {
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(_) => LogError::Missing(name.to_string()),
            _ => request_error(e),
        })
    }

    /// Reads a log stream's current state.
    pub async fn state(&self, log: &UserLog) -> Result<LogState, LogError> {
        let stream = self.stream(&log.stream).await?;
        let info = stream.cached_info();
        Ok(LogState {
            last_seq: info.state.last_sequence,
            first_seq: info.state.first_sequence,
            max_per_subject: info.config.max_messages_per_subject,
        })
    }

    /// Whether nothing durable for the user after `since` has been evicted
    /// (the caller has checked the epoch; `upto` is the registration's
    /// `pos`). Conservative: may say false when nothing was lost, never true
    /// when something was.
    pub async fn recovered(&self, log: &UserLog, since: u64, upto: u64) -> Result<bool, LogError> {
        if since > upto {
            return Ok(false);
        }
        let state = self.state(log).await?;
        // Age limits evict from the front of the whole stream.
        if state.first_seq > since.saturating_add(1) {
            return Ok(false);
        }
        // A per-subject limit evicts a subject's oldest first: if the subject
        // is full and its oldest kept message is after `since`, something
        // after `since` may have been evicted.
        let stream = self.stream(&log.stream).await?;
        for subject in &log.subjects {
            let mut counts = stream.info_with_subjects(subject).await.map_err(request_error)?;
            let mut count = 0u64;
            while let Some((_, n)) = counts.try_next().await.map_err(request_error)? {
                count += n as u64;
            }
            if state.max_per_subject > 0 && count >= state.max_per_subject as u64 {
                let first = stream
                    .direct_get_first_for_subject(subject.as_str())
                    .await
                    .map_err(request_error)?;
                if first.sequence > since.saturating_add(1) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The first message on `subject` with a sequence in `from..=upto`.
    async fn next_on(
        stream: &Stream,
        subject: &str,
        from: u64,
        upto: u64,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, LogError> {
        if from > upto {
            return Ok(None);
        }
        let get = stream.direct_get_next_for_subject(subject, Some(from));
        match tokio::time::timeout(REPLAY_STALL, get).await {
            Err(_) => Err(LogError::Timeout),
            Ok(Ok(m)) if m.sequence <= upto => Ok(Some(m)),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(request_error(e)),
        }
    }

    /// Sends `user`'s durable events with `after < pos <= upto`, in order,
    /// into the connection's data queue (waiting for room: the writer paces it).
    pub async fn replay(&self, log: &UserLog, after: u64, upto: u64, out: &ConnHandle) -> Result<Replayed, LogError> {
        let mut done = Replayed {
            count: 0,
            last_pos: after,
        };
        if upto <= after {
            return Ok(done);
        }
        // Direct gets (next message on a subject from a sequence), merged by
        // sequence, rather than an ordered consumer per resume: a consumer
        // is state on the server that every stored message is then checked
        // against, and a reconnect storm of 10,000 resumes created 10,000
        // of them at once (nats-server pegged, resumes timing out). A direct
        // get is stateless and served by any replica.
        let stream = self.stream(&log.stream).await?;
        let subjects = &log.subjects;
        let mut heads = [None, None];
        for (i, subject) in subjects.iter().enumerate() {
            heads[i] = Self::next_on(&stream, subject, after + 1, upto).await?;
        }
        loop {
            let i = match (&heads[0], &heads[1]) {
                (Some(a), Some(b)) => usize::from(b.sequence < a.sequence),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (None, None) => break,
            };
            let Some(msg) = heads[i].take() else { break };
            let seq = msg.sequence;
            if !out.replayed(Delivery::new(msg.payload, Some(seq), true)).await {
                break;
            }
            done.count += 1;
            done.last_pos = seq;
            heads[i] = Self::next_on(&stream, &subjects[i], seq + 1, upto).await?;
        }
        metrics::counter!("switchyard_edge_replayed_total").increment(done.count);
        Ok(done)
    }
}
