//! The edge's view of the delivery log: replaying a user's durable events
//! after a position, and deciding whether a resume is `recovered`, in a
//! few NATS requests per resume.
//!
//! The router tier owns the log streams (see `switchyard_router::log`); the
//! edge only reads them. A user's durable history is the merge, by stream
//! sequence, of the user's subject and the broadcast subject of the user's
//! partition, both in one stream and written by one router at a time.
//! Replay reads each subject with *batched* direct gets (nats-server 2.11+:
//! one request returns up to [`PAGE`] messages of a subject from a
//! sequence, then an end-of-batch status carrying how many more match), so
//! a resume costs two requests, both sent at once, plus one per further
//! page of a long history. The replies come back on one subscription per
//! edge ([`DirectGets`]), never one per resume.
//!
//! `recovered` comes from the same reads plus the stream's state read
//! *after* them ([`StateCache`]): if the stream's first sequence is still at
//! or below `since + 1` and no subject has as many messages after `since`
//! as its per-subject limit, nothing after `since` was evicted before the
//! reads, so the reads saw everything. Resumes that finish their reads at
//! the same moment share one stream-info request, so a storm costs NATS a
//! handful of them per round, not one per client.
//!
//! Where the user's log is and its `epoch` come with the user's
//! registration ([`crate::intake::Registration`]). Requires the streams'
//! `allow_direct`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Message, StatusCode};
use futures::StreamExt;
use switchyard_common::subject::Subjects;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::conn::{ConnHandle, Delivery};
use crate::intake::Registration;

/// Messages asked of one batched direct get.
pub const PAGE: usize = 256;

/// How long one page of a replay may take to arrive before the replay fails.
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
    /// Publishing a batched direct get.
    #[error("direct get request")]
    Publish(#[from] async_nats::PublishError),
    /// The server answered a batched direct get with an error status.
    #[error("direct get answered {status}: {description}")]
    Status {
        /// The status code.
        status: u16,
        /// The server's description.
        description: String,
    },
    /// A direct-get reply without the headers it must carry.
    #[error("direct get reply without {0}")]
    Header(&'static str),
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
    /// Per subject: messages stored after `since` (read, plus the ones the
    /// server said are left beyond the last page read).
    pub after_since: [u64; 2],
}

/// Read access to the delivery log streams.
pub struct DeliveryLog {
    subjects: Subjects,
    partitions: u32,
    gets: Arc<DirectGets>,
    states: StateCache,
}

impl DeliveryLog {
    /// Finds the first log stream, waiting up to `wait` for a router to
    /// create it, and starts the edge's reply subscription for batched
    /// direct gets (until `cancel`).
    pub async fn open(
        client: async_nats::Client,
        subjects: Subjects,
        partitions: u32,
        wait: Duration,
        cancel: CancellationToken,
    ) -> Result<DeliveryLog, LogError> {
        let js = async_nats::jetstream::new(client.clone());
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
        let gets = DirectGets::start(client.clone(), cancel)
            .await
            .map_err(|e| request_error(RequestFailure::Status {
                status: 0,
                description: format!("cannot subscribe for direct-get replies: {e}"),
            }))?;
        Ok(DeliveryLog {
            subjects,
            partitions,
            gets,
            states: StateCache::new(js),
        })
    }

    /// Where `user`'s history is, given their registration.
    pub fn user_log(&self, user: &str, reg: &Registration) -> UserLog {
        let p = switchyard_common::fanout::user_partition(user, self.partitions);
        UserLog {
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
    /// registration's `pos`). Conservative: may say false when nothing was
    /// lost, never true when something was.
    pub async fn recovered(&self, log: &UserLog, since: u64, upto: u64, replayed: &Replayed) -> Result<bool, LogError> {
        if since > upto {
            return Ok(false);
        }
        let state = self.state(log).await?;
        Ok(recovered_from(&state, since, replayed))
    }

    /// Sends the user's durable events with `after < pos <= upto`, in order,
    /// into the connection's data queue (waiting for room: the writer paces
    /// it), and counts what each subject holds after `since` (at least
    /// `after`).
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
        // Both subjects' first pages are asked at once.
        let mut cursors = [
            Cursor::start(&self.gets, &log.stream, &log.subjects[0], after + 1, since).await?,
            Cursor::start(&self.gets, &log.stream, &log.subjects[1], after + 1, since).await?,
        ];
        let mut heads = [cursors[0].next(&self.gets, upto).await?, cursors[1].next(&self.gets, upto).await?];
        let mut gone = false;
        loop {
            let i = match (&heads[0], &heads[1]) {
                (Some(a), Some(b)) => usize::from(b.0 < a.0),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (None, None) => break,
            };
            let Some((seq, payload)) = heads[i].take() else { break };
            if !out.replayed(Delivery::new(payload, Some(seq), true)).await {
                gone = true;
                break;
            }
            done.count += 1;
            done.last_pos = seq;
            heads[i] = cursors[i].next(&self.gets, upto).await?;
        }
        if !gone {
            for (i, c) in cursors.iter_mut().enumerate() {
                done.after_since[i] = c.finish().await?;
            }
        }
        metrics::counter!("switchyard_edge_replayed_total").increment(done.count);
        Ok(done)
    }
}

/// Whether `replayed` (reads done before `state` was read) saw everything
/// stored after `since`. Pure, for tests.
pub fn recovered_from(state: &LogState, since: u64, replayed: &Replayed) -> bool {
    // Age and size limits evict from the front of the whole stream.
    if state.first_seq > since.saturating_add(1) {
        return false;
    }
    // A per-subject limit evicts a subject's oldest first: a subject with
    // as many messages after `since` as the limit may have lost older ones.
    state.max_per_subject <= 0 || replayed.after_since.iter().all(|&n| n < state.max_per_subject as u64)
}

/// One subject's read: pages of a batched direct get, in sequence order.
struct Cursor {
    stream: String,
    subject: String,
    since: u64,
    page: Option<Page>,
    /// The next sequence to ask from when this page ends.
    next_seq: u64,
    /// Messages read with a sequence after `since`.
    after_since: u64,
    /// Messages the last end-of-batch said are left after the last page.
    left: u64,
    /// No more pages to ask for.
    exhausted: bool,
}

impl Cursor {
    async fn start(gets: &Arc<DirectGets>, stream: &str, subject: &str, from: u64, since: u64) -> Result<Cursor, LogError> {
        let page = gets.request(stream, subject, from).await?;
        Ok(Cursor {
            stream: stream.to_string(),
            subject: subject.to_string(),
            since,
            page: Some(page),
            next_seq: from,
            after_since: 0,
            left: 0,
            exhausted: false,
        })
    }

    /// The next message at or below `upto`; `None` once past it or at the end.
    async fn next(&mut self, gets: &Arc<DirectGets>, upto: u64) -> Result<Option<(u64, bytes::Bytes)>, LogError> {
        loop {
            let Some(page) = self.page.as_mut() else {
                return Ok(None);
            };
            match page.next().await? {
                Reply::Message { seq, payload } => {
                    self.next_seq = seq + 1;
                    if seq > self.since {
                        self.after_since += 1;
                    }
                    if seq <= upto {
                        return Ok(Some((seq, payload)));
                    }
                    // Past what this resume replays: the rest is live.
                    self.exhausted = true;
                }
                Reply::End { left } => {
                    self.left = left;
                    self.page = None;
                    if left == 0 || self.exhausted || self.next_seq > upto {
                        self.exhausted = true;
                        return Ok(None);
                    }
                    self.page = Some(gets.request(&self.stream, &self.subject, self.next_seq).await?);
                }
                Reply::NotFound => {
                    self.left = 0;
                    self.page = None;
                    self.exhausted = true;
                    return Ok(None);
                }
            }
        }
    }

    /// Reads what is left of the current page (bounded by [`PAGE`]); the
    /// number of messages stored after `since` on this subject.
    async fn finish(&mut self) -> Result<u64, LogError> {
        while let Some(page) = self.page.as_mut() {
            match page.next().await? {
                Reply::Message { seq, .. } => {
                    if seq > self.since {
                        self.after_since += 1;
                    }
                }
                Reply::End { left } => {
                    self.left = left;
                    self.page = None;
                }
                Reply::NotFound => self.page = None,
            }
        }
        Ok(self.after_since + self.left)
    }
}

/// One item of a batched direct get's answer.
enum Reply {
    Message { seq: u64, payload: bytes::Bytes },
    /// End of batch: this many more messages match after the last one sent.
    End { left: u64 },
    /// Nothing matched at all.
    NotFound,
}

/// The replies to one batched direct get; unregisters itself when dropped.
struct Page {
    rx: mpsc::Receiver<Message>,
    token: u64,
    gets: Arc<DirectGets>,
}

impl Page {
    async fn next(&mut self) -> Result<Reply, LogError> {
        let msg = match tokio::time::timeout(REPLAY_STALL, self.rx.recv()).await {
            Err(_) | Ok(None) => return Err(LogError::Timeout),
            Ok(Some(m)) => m,
        };
        match msg.status {
            Some(StatusCode::NOT_FOUND) => Ok(Reply::NotFound),
            Some(s) if s.as_u16() == 204 => Ok(Reply::End {
                left: header_u64(&msg, "Nats-Num-Pending")?,
            }),
            Some(s) if s != StatusCode::OK => Err(request_error(RequestFailure::Status {
                status: s.as_u16(),
                description: msg.description.clone().unwrap_or_default(),
            })),
            _ => Ok(Reply::Message {
                seq: header_u64(&msg, "Nats-Sequence")?,
                payload: msg.payload,
            }),
        }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.gets.waiting.lock().expect("direct gets lock").remove(&self.token);
    }
}

fn header_u64(msg: &Message, name: &'static str) -> Result<u64, LogError> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
        .ok_or(request_error(RequestFailure::Header(name)))
}

/// Batched direct gets with their replies on one subscription per edge:
/// each request gets a token, and the dispatcher routes replies by it.
pub struct DirectGets {
    client: async_nats::Client,
    /// `<inbox>.` : replies come to `<inbox>.<token>`.
    reply_prefix: String,
    next_token: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
}

impl DirectGets {
    async fn start(client: async_nats::Client, cancel: CancellationToken) -> Result<Arc<DirectGets>, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(format!("{inbox}.*")).await?;
        let gets = Arc::new(DirectGets {
            client,
            reply_prefix: format!("{inbox}."),
            next_token: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        });
        let routes = gets.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => return,
                    },
                };
                let token = msg
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok());
                let Some(token) = token else { continue };
                let tx = routes.waiting.lock().expect("direct gets lock").get(&token).cloned();
                // Room for a whole page is reserved per request; a reply to a
                // request nobody waits for any more is dropped.
                if let Some(tx) = tx {
                    let _ = tx.try_send(msg);
                }
            }
        });
        Ok(gets)
    }

    /// Asks for up to [`PAGE`] messages on `subject` from sequence `from`.
    async fn request(self: &Arc<DirectGets>, stream: &str, subject: &str, from: u64) -> Result<Page, LogError> {
        // At most PAGE messages and one end-of-batch (or one not-found).
        let (tx, rx) = mpsc::channel(PAGE + 1);
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().expect("direct gets lock").insert(token, tx);
        let page = Page {
            rx,
            token,
            gets: self.clone(),
        };
        let body = serde_json::json!({ "seq": from, "next_by_subj": subject, "batch": PAGE });
        metrics::counter!("switchyard_edge_log_requests_total", "kind" => "direct_get_batch").increment(1);
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("{}{token}", self.reply_prefix),
                body.to_string().into(),
            )
            .await
            .map_err(request_error)?;
        Ok(page)
    }
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

/// Clears [`StateSlot::fetching`] even when the fetching resume is dropped.
struct Fetching<'a>(&'a AtomicBool);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
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
        loop {
            if let Some((at, state)) = rx.borrow_and_update().as_ref() {
                if *at >= asked {
                    return Ok(state.clone());
                }
            }
            if !slot.fetching.swap(true, Ordering::AcqRel) {
                let _fetching = Fetching(&slot.fetching);
                let sent = Instant::now();
                let state = self.fetch(stream).await?;
                slot.latest.send_replace(Some((sent, state.clone())));
                return Ok(state);
            }
            // Someone else's request is on its way; if it started before us
            // we go round again and send the next one.
            if tokio::time::timeout(REPLAY_STALL, rx.changed()).await.is_err() {
                return Err(LogError::Timeout);
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
        assert!(recovered_from(&state(11, 0), 10, &replayed([5, 0])), "the first kept is since + 1");
        assert!(!recovered_from(&state(12, 0), 10, &replayed([5, 0])), "since + 1 was evicted");
        assert!(recovered_from(&state(1, 10), 0, &replayed([9, 9])));
        assert!(
            !recovered_from(&state(1, 10), 0, &replayed([10, 0])),
            "a full subject may have lost its oldest"
        );
        assert!(!recovered_from(&state(1, 10), 0, &replayed([0, 10])), "the broadcast subject too");
    }
}
