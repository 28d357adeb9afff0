//! One simulated client: connects from a chosen loopback source address,
//! authenticates with a header token, subscribes, and then reads every
//! frame, noting each event in its accounting. In the reconnect storm it
//! drops its socket on signal and comes back with resume.
//!
//! With `--deflate` a client offers permessage-deflate and speaks through
//! the harness's raw client ([`crate::deflate_client`]), which inflates
//! (tungstenite cannot); its reads are not cancel-safe, which is fine here:
//! a read is only ever cancelled when the connection is being given up.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use switchyard_common::transcode::json_to_msgpack;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::stats::{Counters, Latency, Seen, Verdict};
use super::wire::{self, Kind};
use crate::deflate_client::{Message as DeflateMessage, RawWs};

/// What a client needs to know to connect.
pub struct ClientSpec {
    /// Its user index.
    pub user: usize,
    /// Stays connected through storms (its latency then is the bystanders').
    pub bystander: bool,
    /// The edge to connect to.
    pub edge: SocketAddr,
    /// The loopback source address.
    pub source: Ipv4Addr,
    /// Its bearer token.
    pub token: String,
    /// `subscribe` frames to send after the first `ready` (JSON form).
    pub subscribe: Vec<Value>,
    /// Offer permessage-deflate.
    pub deflate: bool,
}

/// What a client reports at the end.
#[derive(Debug, Default)]
pub struct ClientReport {
    /// Its user index.
    pub user: usize,
    /// Its accounting.
    pub seen: Seen,
    /// Times it connected (1 + reconnects).
    pub connects: u64,
    /// The first error that ended it early, if any.
    pub error: Option<String>,
    /// Whether its last resume said `recovered: true` (storms only).
    pub recovered: Option<bool>,
}

/// What all clients share.
pub struct Shared {
    /// Counters.
    pub counters: Counters,
    /// Latencies.
    pub latency: Latency,
    /// Latencies of bystanders' live events during a storm.
    pub bystander_latency: Latency,
    /// Caps connection attempts in flight.
    pub connect_slots: Semaphore,
    /// Bumped to make every client drop its socket and reconnect with resume.
    pub storm: watch::Receiver<u64>,
    /// Clients back (resumed) after the current storm.
    pub resumed: std::sync::atomic::AtomicU64,
    /// Ends every client.
    pub stop: CancellationToken,
}

/// A client's connection: tungstenite, or the raw client when it offers deflate.
enum Ws {
    Plain(Box<WebSocketStream<TcpStream>>),
    Deflate(Box<RawWs>),
}

/// What [`Ws::next`] hands back.
enum Msg {
    Binary(bytes::Bytes),
    Close(String),
    Other,
}

impl Ws {
    /// The next message; data frames are counted in `counters` (wire bytes).
    async fn next(&mut self, counters: &Counters) -> Option<Result<Msg>> {
        match self {
            Ws::Plain(ws) => Some(match ws.next().await? {
                Ok(Message::Binary(b)) => {
                    let n = b.len();
                    let head = if n < 126 {
                        2
                    } else if n <= 0xffff {
                        4
                    } else {
                        10
                    };
                    counters.wire_bytes.fetch_add((n + head) as u64, Ordering::Relaxed);
                    Ok(Msg::Binary(b))
                }
                Ok(Message::Close(c)) => Ok(Msg::Close(format!("{c:?}"))),
                Ok(_) => Ok(Msg::Other),
                Err(e) => Err(e.into()),
            }),
            Ws::Deflate(ws) => Some(match ws.read_message().await {
                Ok(DeflateMessage::Data {
                    compressed,
                    payload,
                    wire_bytes,
                    ..
                }) => {
                    counters.wire_bytes.fetch_add(wire_bytes as u64, Ordering::Relaxed);
                    if compressed {
                        counters.compressed_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Msg::Binary(payload.into()))
                }
                Ok(DeflateMessage::Ping(p)) => ws.send_frame(0x8A, &p).await.map(|()| Msg::Other),
                Ok(DeflateMessage::Close(code, reason)) => Ok(Msg::Close(format!("{code} {reason}"))),
                Ok(DeflateMessage::Pong) => Ok(Msg::Other),
                Err(e) => Err(e),
            }),
        }
    }

    async fn send_binary(&mut self, b: Vec<u8>) -> Result<()> {
        match self {
            Ws::Plain(ws) => Ok(ws.send(Message::binary(b)).await?),
            Ws::Deflate(ws) => ws.send(0x2, &b, false).await,
        }
    }

    async fn close(&mut self) {
        match self {
            Ws::Plain(ws) => {
                let _ = WebSocketStream::close(ws, None).await;
            }
            Ws::Deflate(ws) => {
                let _ = ws.send_frame(0x88, &1000u16.to_be_bytes()).await;
            }
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn connect(spec: &ClientSpec, resume: Option<(&str, u64)>) -> Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((spec.source, 0).into()).context("bind source address")?;
    let stream = socket.connect(spec.edge).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    if spec.deflate {
        let path = match resume {
            Some((epoch, since)) => format!("/ws?epoch={epoch}&since={since}"),
            None => "/ws".to_string(),
        };
        let bearer = format!("Bearer {}", spec.token);
        let headers = [
            ("Authorization", bearer.as_str()),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ];
        let ws = RawWs::upgrade(stream, spec.edge, &path, &headers)
            .await
            .context("websocket handshake")?;
        // A run that asked for compression and did not get it measures nothing.
        if !ws
            .extensions
            .as_deref()
            .is_some_and(|e| e.starts_with("permessage-deflate"))
        {
            anyhow::bail!("the edge did not negotiate permessage-deflate: {:?}", ws.extensions);
        }
        return Ok(Ws::Deflate(Box::new(ws)));
    }
    let url = match resume {
        Some((epoch, since)) => format!("ws://{}/ws?epoch={epoch}&since={since}", spec.edge),
        None => format!("ws://{}/ws", spec.edge),
    };
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {}", spec.token))?,
    );
    // tungstenite's default read buffer is 128 KiB per connection; frames here are small.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("websocket handshake")?;
    Ok(Ws::Plain(Box::new(ws)))
}

/// Reads control frames until `op` arrives; events that come first are noted.
async fn until_op(ws: &mut Ws, op: &str, shared: &Shared, state: &mut State, timeout: Duration) -> Result<rmpv::Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::select! {
            _ = shared.stop.cancelled() => bail!("stopped while waiting for {op}"),
            n = tokio::time::timeout_at(deadline, ws.next(&shared.counters)) => n,
        };
        let msg = next
            .map_err(|_| anyhow!("no {op} within {timeout:?}"))?
            .ok_or_else(|| anyhow!("closed before {op}"))??;
        let Msg::Binary(b) = msg else {
            if let Msg::Close(c) = msg {
                bail!("closed before {op}: {c}");
            }
            continue;
        };
        if let Kind::Other(got) = state.frame(&b, shared)? {
            let v = rmpv::decode::read_value(&mut &b[..])?;
            if got == op {
                return Ok(v);
            }
            if got == "error" {
                bail!("error while waiting for {op}: {v}");
            }
        }
    }
}

/// A client's accounting while it runs.
struct State {
    user: usize,
    bystander: bool,
    seen: Seen,
    scratch: Vec<wire::Seen>,
}

impl State {
    fn frame(&mut self, b: &[u8], shared: &Shared) -> Result<Kind> {
        self.scratch.clear();
        let kind = wire::read_frame(b, &mut self.scratch)?;
        match &kind {
            Kind::Events => {
                let now = now_us();
                let n = self.scratch.len() as u64;
                let mut new = 0;
                for s in &self.scratch {
                    if self.seen.note(s.seq, s.pos) == Verdict::New {
                        new += 1;
                    }
                }
                shared.counters.received.fetch_add(n, Ordering::Relaxed);
                shared.counters.event_frames.fetch_add(1, Ordering::Relaxed);
                shared.counters.unique.fetch_add(new, Ordering::Relaxed);
                let window = shared.latency.window();
                shared.latency.record(
                    self.user,
                    window,
                    self.scratch.iter().map(|s| (s.t_us, now.saturating_sub(s.t_us))),
                );
                if self.bystander {
                    let window = shared.bystander_latency.window();
                    shared.bystander_latency.record(
                        self.user,
                        window,
                        self.scratch.iter().map(|s| (s.t_us, now.saturating_sub(s.t_us))),
                    );
                }
            }
            Kind::Dropped { count, rate_limited } => {
                let c = if *rate_limited {
                    &shared.counters.dropped_rate_limited
                } else {
                    &shared.counters.dropped_slow_consumer
                };
                c.fetch_add(*count, Ordering::Relaxed);
            }
            Kind::Other(_) => {}
        }
        Ok(kind)
    }
}

/// Failed connects or resumes a client retries before it gives up.
const MAX_RETRIES: u32 = 30;

/// Sends the client's subscriptions, one `ok` at a time.
async fn subscribe(ws: &mut Ws, spec: &ClientSpec, shared: &Shared, state: &mut State) -> Result<()> {
    for (i, sub) in spec.subscribe.iter().enumerate() {
        let mut frame = sub.clone();
        frame["id"] = Value::from(i as u64 + 1);
        let mut buf = Vec::new();
        json_to_msgpack(&frame, &mut buf);
        ws.send_binary(buf).await?;
        until_op(ws, "ok", shared, state, Duration::from_secs(60)).await?;
    }
    Ok(())
}

/// Exponential backoff from 100 ms to 5 s, jittered by user so a storm spreads out.
fn backoff(user: usize, attempt: u32) -> Duration {
    let base = (100u64 << attempt.min(6)).min(5_000);
    let jitter = super::plan::Rng::new(user as u64 ^ u64::from(attempt) << 32).unit();
    Duration::from_millis((base as f64 * (0.5 + jitter)) as u64)
}

/// Runs one client until `shared.stop`; never panics on server behaviour.
pub async fn run(spec: ClientSpec, shared: Arc<Shared>) -> ClientReport {
    let mut state = State {
        user: spec.user,
        bystander: spec.bystander,
        seen: Seen::default(),
        scratch: Vec::with_capacity(64),
    };
    let mut report = ClientReport {
        user: spec.user,
        ..ClientReport::default()
    };
    if let Err(e) = session(&spec, &shared, &mut state, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report.seen = state.seen;
    report
}

async fn session(spec: &ClientSpec, shared: &Shared, state: &mut State, report: &mut ClientReport) -> Result<()> {
    let mut storm = shared.storm.clone();
    let mut epoch = String::new();
    let mut resume = false;
    let mut retries = 0;
    loop {
        let mut ws = {
            let _slot = shared.connect_slots.acquire().await?;
            let mut attempt = 0;
            loop {
                let r = tokio::select! {
                    _ = shared.stop.cancelled() => return Ok(()),
                    r = connect(spec, resume.then_some((epoch.as_str(), state.seen.last_pos))) => r,
                };
                match r {
                    Ok(ws) => break ws,
                    Err(e) if attempt < 20 => {
                        shared.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                        attempt += 1;
                        tracing::debug!(error = %e, "connect failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        report.connects += 1;
        let ready = until_op(&mut ws, "ready", shared, state, Duration::from_secs(60)).await;
        let resumed = match ready {
            Ok(ready) => {
                if let Some(e) = ready.as_map().and_then(|m| switchyard_common::value::get(m, "epoch")) {
                    epoch = e.as_str().unwrap_or_default().to_string();
                }
                if resume {
                    until_op(&mut ws, "resumed", shared, state, Duration::from_secs(120))
                        .await
                        .map(Some)
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(e),
        };
        let established = match resumed {
            Ok(r) if resume => {
                report.recovered = r
                    .as_ref()
                    .and_then(|r| r.as_map())
                    .and_then(|m| switchyard_common::value::get(m, "recovered"))
                    .and_then(|v| v.as_bool());
                shared.resumed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(_) => subscribe(&mut ws, spec, shared, state).await,
            Err(e) => Err(e),
        };
        match established {
            Ok(()) => {
                retries = 0;
                if !resume {
                    shared.counters.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
            // As a real client does when the server says `unavailable` or
            // the connection fails: back off (jittered) and try again, with
            // resume once it has been connected.
            Err(e) if retries < MAX_RETRIES => {
                retries += 1;
                shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, retries, "connect or resume failed; retrying");
                drop(ws);
                tokio::select! {
                    _ = shared.stop.cancelled() => return Err(e.context("stopped while retrying")),
                    _ = tokio::time::sleep(backoff(spec.user, retries)) => continue,
                }
            }
            Err(e) => return Err(e),
        }
        storm.borrow_and_update();
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => {
                    ws.close().await;
                    return Ok(());
                }
                changed = storm.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if spec.bystander {
                        continue;
                    }
                    // Drop the socket without a close frame: a lost network, not a goodbye.
                    drop(ws);
                    resume = true;
                    break;
                }
                msg = ws.next(&shared.counters) => match msg {
                    Some(Ok(Msg::Binary(b))) => {
                        state.frame(&b, shared)?;
                    }
                    Some(Ok(Msg::Close(c))) => bail!("server closed: {c}"),
                    Some(Ok(Msg::Other)) => {}
                    Some(Err(e)) => bail!("read: {e}"),
                    None => bail!("connection ended"),
                }
            }
        }
    }
}
