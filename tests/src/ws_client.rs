//! A small WebSocket client that speaks the Switchyard protocol, for tests
//! and the tail tool. Frames are shown to callers as JSON values whatever
//! the encoding, so assertions read the same for both.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use switchyard_common::transcode::{json_to_msgpack, msgpack_to_json};
use switchyard_common::Encoding;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for an expected frame.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A protocol frame, as JSON.
    Frame(Value),
    /// The server closed with this code and reason.
    Closed(u16, String),
}

/// A connected protocol client.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The negotiated encoding.
    pub encoding: Encoding,
}

/// Options for connecting.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// `Authorization: Bearer` token.
    pub bearer: Option<String>,
    /// Subprotocols to offer (empty: offer none, meaning MessagePack).
    pub protocols: Vec<String>,
    /// Query string (without `?`).
    pub query: Option<String>,
}

impl WsClient {
    /// Connects; returns the HTTP status on a refused upgrade.
    pub async fn connect(url: &str, opts: &Connect) -> Result<WsClient, ConnectError> {
        Self::connect_inner(url, opts, None).await
    }

    /// Connects over plain `ws://` with the socket's receive buffer fixed at
    /// `recv_buffer` bytes. A fixed size turns off the kernel's autotuning
    /// (which grows to tens of MiB on some machines), so a client that stops
    /// reading backs the server up after a known, small amount.
    pub async fn connect_with_recv_buffer(
        url: &str,
        opts: &Connect,
        recv_buffer: u32,
    ) -> Result<WsClient, ConnectError> {
        Self::connect_inner(url, opts, Some(recv_buffer)).await
    }

    async fn connect_inner(url: &str, opts: &Connect, recv_buffer: Option<u32>) -> Result<WsClient, ConnectError> {
        let full = match &opts.query {
            Some(q) => format!("{url}?{q}"),
            None => url.to_string(),
        };
        let mut req = full
            .into_client_request()
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(t) = &opts.bearer {
            req.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        if !opts.protocols.is_empty() {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&opts.protocols.join(", ")).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        let connected = match recv_buffer {
            None => tokio_tungstenite::connect_async(req).await,
            Some(size) => {
                let uri = req.uri();
                let addr = format!("{}:{}", uri.host().unwrap_or("127.0.0.1"), uri.port_u16().unwrap_or(80));
                let addr: std::net::SocketAddr = addr.parse().map_err(|e| ConnectError::Other(format!("{e}")))?;
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(|e| ConnectError::Other(e.to_string()))?;
                socket
                    .set_recv_buffer_size(size)
                    .map_err(|e| ConnectError::Other(e.to_string()))?;
                let stream = socket
                    .connect(addr)
                    .await
                    .map_err(|e| ConnectError::Other(e.to_string()))?;
                tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await
            }
        };
        match connected {
            Ok((ws, resp)) => {
                let encoding = match resp
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                {
                    Some("switchyard.v1.json") => Encoding::Json,
                    _ => Encoding::MsgPack,
                };
                Ok(WsClient { ws, encoding })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(ConnectError::Status(resp.status().as_u16())),
            Err(e) => Err(ConnectError::Other(e.to_string())),
        }
    }

    /// Connects with a bearer token and waits for `ready`.
    pub async fn connect_ready(url: &str, token: &str, protocols: &[&str]) -> Result<(WsClient, Value)> {
        let opts = Connect {
            bearer: Some(token.to_string()),
            protocols: protocols.iter().map(|s| s.to_string()).collect(),
            query: None,
        };
        let mut c = WsClient::connect(url, &opts)
            .await
            .map_err(|e| anyhow!("connect: {e:?}"))?;
        let ready = c.expect_op("ready").await?;
        Ok((c, ready))
    }

    /// The underlying WebSocket stream (for tools that read at full speed).
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }

    /// Sends a frame given as JSON, in the connection's encoding.
    pub async fn send(&mut self, frame: &Value) -> Result<()> {
        let msg = match self.encoding {
            Encoding::Json => Message::text(frame.to_string()),
            Encoding::MsgPack => {
                let mut buf = Vec::new();
                json_to_msgpack(frame, &mut buf);
                Message::binary(buf)
            }
        };
        self.ws.send(msg).await.context("send")
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: Message) -> Result<()> {
        self.ws.send(msg).await.context("send")
    }

    /// The next frame or close, within `WAIT`.
    pub async fn next(&mut self) -> Result<Incoming> {
        self.next_within(WAIT)
            .await?
            .ok_or_else(|| anyhow!("nothing received within {WAIT:?}"))
    }

    /// The next frame or close, or `None` if nothing came within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Incoming>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Ok(Some(Incoming::Closed(1006, "stream ended".into()))),
                Ok(Some(Err(e))) => return Ok(Some(Incoming::Closed(1006, e.to_string()))),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    if self.encoding != Encoding::Json {
                        bail!("text frame on a MessagePack connection: {t}");
                    }
                    return Ok(Some(Incoming::Frame(serde_json::from_str(&t)?)));
                }
                Message::Binary(b) => {
                    if self.encoding != Encoding::MsgPack {
                        bail!("binary frame on a JSON connection");
                    }
                    let mut json = Vec::new();
                    msgpack_to_json(&b, &mut json)?;
                    return Ok(Some(Incoming::Frame(serde_json::from_slice(&json)?)));
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Some(Incoming::Closed(code, reason)));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// The next frame, which must be a frame (not a close).
    pub async fn frame(&mut self) -> Result<Value> {
        match self.next().await? {
            Incoming::Frame(v) => Ok(v),
            Incoming::Closed(code, reason) => bail!("closed {code} {reason:?} while waiting for a frame"),
        }
    }

    /// Waits for a frame with this `op`, failing on any other frame first.
    pub async fn expect_op(&mut self, op: &str) -> Result<Value> {
        let f = self.frame().await?;
        if f["op"] != op {
            bail!("expected {op}, got {f}");
        }
        Ok(f)
    }

    /// Sends a request with `id` and returns the reply with that id (skipping events).
    pub async fn request(&mut self, mut frame: Value, id: u32) -> Result<Value> {
        frame["id"] = Value::from(id);
        self.send(&frame).await?;
        loop {
            let f = self.frame().await?;
            if f["id"] == id {
                return Ok(f);
            }
            if f["op"] != "event" && f["op"] != "batch" {
                bail!("unexpected frame while waiting for reply {id}: {f}");
            }
        }
    }

    /// Sends a request and asserts an `ok` reply.
    pub async fn ok(&mut self, frame: Value, id: u32) -> Result<()> {
        let r = self.request(frame, id).await?;
        if r["op"] != "ok" {
            bail!("expected ok, got {r}");
        }
        Ok(())
    }

    /// Collects events (flattening batches) until one satisfies `last`, within `WAIT`.
    pub async fn events_until(&mut self, last: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            let f = self.frame().await?;
            let mut found = false;
            let events: Vec<Value> = match f["op"].as_str() {
                Some("event") => vec![f],
                Some("batch") => f["events"].as_array().cloned().unwrap_or_default(),
                _ => bail!("unexpected frame while collecting events: {f}"),
            };
            for e in events {
                found |= last(&e);
                out.push(e);
            }
            if found {
                return Ok(out);
            }
        }
    }

    /// Collects exactly `n` events (flattening batches); any other frame, or
    /// a batch that goes past `n`, is an error.
    pub async fn take_events(&mut self, n: usize) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self
                .frame()
                .await
                .with_context(|| format!("after {} of {n} events", out.len()))?;
            match f["op"].as_str() {
                Some("event") => out.push(f),
                Some("batch") => out.extend(f["events"].as_array().cloned().unwrap_or_default()),
                _ => bail!("unexpected frame while collecting events: {f}"),
            }
        }
        if out.len() != n {
            bail!("expected {n} events, got {}", out.len());
        }
        Ok(out)
    }

    /// Reads a resume's replay after `ready`: events (batches flattened)
    /// until `resumed`, and the `resumed` frame; any other frame is an error.
    pub async fn replay(&mut self) -> Result<(Vec<Value>, Value)> {
        let mut evs = Vec::new();
        loop {
            let f = self.frame().await?;
            match f["op"].as_str() {
                Some("event") => evs.push(f),
                Some("batch") => evs.extend(f["events"].as_array().cloned().unwrap_or_default()),
                Some("resumed") => return Ok((evs, f)),
                _ => bail!("unexpected frame during replay: {f}"),
            }
        }
    }

    /// Waits for the server to close; returns the close code.
    pub async fn expect_close(&mut self) -> Result<u16> {
        loop {
            match self.next().await? {
                Incoming::Closed(code, _) => return Ok(code),
                Incoming::Frame(_) => continue,
            }
        }
    }
}

/// An event's `pos` (panics when it has none: for durable events).
pub fn event_pos(e: &Value) -> u64 {
    e["pos"].as_u64().unwrap_or_else(|| panic!("no pos in {e}"))
}

/// The `data.i` of each event: the tests number their events so.
pub fn data_i(evs: &[Value]) -> Vec<u64> {
    evs.iter().map(|e| e["data"]["i"].as_u64().expect("data.i")).collect()
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectError {
    /// The server answered the upgrade with this HTTP status.
    Status(u16),
    /// Anything else.
    Other(String),
}
