//! A raw WebSocket client that can offer permessage-deflate (RFC 7692):
//! tokio-tungstenite in this workspace cannot, so the deflate tests and the
//! load generator's `--deflate` speak the frames themselves.
//!
//! It does the HTTP upgrade by hand (so a test picks every header, the
//! extension offer included), reads server frames with their reserved bits
//! visible, inflates compressed messages (with one decompressor kept for
//! the connection when the server did not promise
//! `server_no_context_takeover`), and sends masked client frames, compressed
//! or not, or any raw frame a test wants to break the rules with.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What a sync flush ends with; cut from compressed messages on the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// One server frame as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN.
    pub fin: bool,
    /// The reserved bits (`0x40` RSV1, `0x20` RSV2, `0x10` RSV3).
    pub rsv: u8,
    /// The opcode.
    pub opcode: u8,
    /// The payload (servers do not mask).
    pub payload: Vec<u8>,
}

/// One whole server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text (1) or binary (2) message, inflated if it came compressed.
    Data {
        /// Its opcode.
        opcode: u8,
        /// It came with RSV1 (compressed).
        compressed: bool,
        /// Its payload, inflated.
        payload: Vec<u8>,
        /// Bytes it took on the wire, headers included.
        wire_bytes: usize,
    },
    /// A ping.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame: code (1005 when absent) and reason.
    Close(u16, String),
}

/// A connected client.
pub struct RawWs {
    io: BufReader<TcpStream>,
    /// The server's `Sec-WebSocket-Extensions` answer, if any.
    pub extensions: Option<String>,
    /// The server's `Sec-WebSocket-Protocol` answer, if any.
    pub protocol: Option<String>,
    /// The decompressor, kept for the connection when the server keeps its window.
    inflater: Decompress,
    server_takeover: bool,
    mask_seed: u32,
    /// Bytes read from the socket after the upgrade.
    pub wire_bytes_read: u64,
}

/// Compresses `payload` as one permessage-deflate message would carry it:
/// raw deflate, sync flush, the `00 00 ff ff` tail cut.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    loop {
        let before = c.total_in() as usize;
        c.compress_vec(&payload[before..], &mut out, FlushCompress::Sync)
            .expect("deflate into a vector");
        if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    assert!(out.ends_with(&TAIL), "a sync flush ends with 00 00 ff ff");
    out.truncate(out.len() - TAIL.len());
    out
}

/// Inflates one compressed message with `d` (its tail put back).
pub fn inflate_with(d: &mut Decompress, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 4 + 64);
    for (mut input, flush) in [(data, FlushDecompress::None), (&TAIL[..], FlushDecompress::Sync)] {
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(256));
            }
            let before = d.total_in();
            let status = d.decompress_vec(input, &mut out, flush).context("inflate")?;
            input = &input[(d.total_in() - before) as usize..];
            if status == Status::StreamEnd || (input.is_empty() && out.len() < out.capacity()) {
                break;
            }
        }
    }
    Ok(out)
}

impl RawWs {
    /// Upgrades `GET path` at `addr` with these extra headers
    /// (`Authorization`, `Sec-WebSocket-Extensions`, ...). An answer other
    /// than 101 is an error naming the status.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<RawWs> {
        let stream = TcpStream::connect(addr).await.context("tcp connect")?;
        Self::upgrade(stream, addr, path, headers).await
    }

    /// [`RawWs::connect`] over a stream the caller connected (the load
    /// generator binds a source address first).
    pub async fn upgrade(stream: TcpStream, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<RawWs> {
        stream.set_nodelay(true)?;
        let mut io = BufReader::with_capacity(4096, stream);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        io.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        io.read_line(&mut line).await?;
        if !line.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {}", line.trim());
        }
        let (mut extensions, mut protocol) = (None, None);
        loop {
            line.clear();
            if io.read_line(&mut line).await? == 0 {
                bail!("connection closed in the upgrade response");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("sec-websocket-extensions") {
                    extensions = Some(v.trim().to_string());
                } else if k.eq_ignore_ascii_case("sec-websocket-protocol") {
                    protocol = Some(v.trim().to_string());
                }
            }
        }
        let server_takeover = extensions
            .as_deref()
            .is_some_and(|e| !e.contains("server_no_context_takeover"));
        Ok(RawWs {
            io,
            extensions,
            protocol,
            inflater: Decompress::new(false),
            server_takeover,
            mask_seed: 0x1234_5678,
            wire_bytes_read: 0,
        })
    }

    /// Reads one frame.
    pub async fn read_frame(&mut self) -> Result<Frame> {
        let mut head = [0u8; 2];
        self.io.read_exact(&mut head).await?;
        let mut len = u64::from(head[1] & 0x7f);
        let mut wire = 2;
        if len == 126 {
            len = u64::from(self.io.read_u16().await?);
            wire += 2;
        } else if len == 127 {
            len = self.io.read_u64().await?;
            wire += 8;
        }
        if head[1] & 0x80 != 0 {
            bail!("a masked server frame");
        }
        let mut payload = vec![0; usize::try_from(len)?];
        self.io.read_exact(&mut payload).await?;
        self.wire_bytes_read += wire + len;
        Ok(Frame {
            fin: head[0] & 0x80 != 0,
            rsv: head[0] & 0x70,
            opcode: head[0] & 0x0f,
            payload,
        })
    }

    /// Reads one whole message, inflating it if it came compressed.
    pub async fn read_message(&mut self) -> Result<Message> {
        let start = self.wire_bytes_read;
        let first = self.read_frame().await?;
        match first.opcode {
            0x8 => {
                let p = &first.payload;
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                return Ok(Message::Close(code, reason));
            }
            0x9 => return Ok(Message::Ping(first.payload)),
            0xA => return Ok(Message::Pong),
            0x1 | 0x2 => {}
            op => bail!("unexpected opcode {op:#x}"),
        }
        if first.rsv & 0x30 != 0 {
            bail!("RSV2/RSV3 set by the server");
        }
        let compressed = first.rsv & 0x40 != 0;
        let opcode = first.opcode;
        let mut payload = first.payload;
        let mut fin = first.fin;
        while !fin {
            let f = self.read_frame().await?;
            if f.opcode != 0 || f.rsv != 0 {
                bail!("a continuation frame with opcode {:#x} or RSV {:#x}", f.opcode, f.rsv);
            }
            payload.extend_from_slice(&f.payload);
            fin = f.fin;
        }
        if compressed {
            if self.extensions.is_none() {
                bail!("RSV1 without a negotiated extension");
            }
            if !self.server_takeover {
                self.inflater.reset(false);
            }
            payload = inflate_with(&mut self.inflater, &payload)?;
        }
        Ok(Message::Data {
            opcode,
            compressed,
            payload,
            wire_bytes: (self.wire_bytes_read - start) as usize,
        })
    }

    /// Reads messages until a data message, answering nothing; a close is an error.
    pub async fn read_data(&mut self) -> Result<(Vec<u8>, bool)> {
        loop {
            match self.read_message().await? {
                Message::Data {
                    payload, compressed, ..
                } => return Ok((payload, compressed)),
                Message::Close(code, reason) => return Err(anyhow!("closed: {code} {reason}")),
                _ => {}
            }
        }
    }

    /// Sends one masked frame whose first byte is `first` (FIN, RSV bits, opcode).
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) -> Result<()> {
        self.mask_seed = self.mask_seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let mask = self.mask_seed.to_be_bytes();
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push(first);
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.io.get_mut().write_all(&out).await?;
        Ok(())
    }

    /// Sends a data message (`opcode` 1 or 2), compressed (RSV1) or not.
    pub async fn send(&mut self, opcode: u8, payload: &[u8], compressed: bool) -> Result<()> {
        if compressed {
            self.send_frame(0x80 | 0x40 | opcode, &compress(payload)).await
        } else {
            self.send_frame(0x80 | opcode, payload).await
        }
    }
}
