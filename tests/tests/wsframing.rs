//! RFC 6455 framing rules over a real socket: hand-made client frames on a
//! raw TCP connection, and the close code the edge answers with
//! (docs/PROTOCOL.md, "Errors and close codes": WebSocket framing).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use switchyard_tests::fleet::Fleet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `b0` is FIN, RSV and opcode; masked unless `masked` is false.
fn frame_with(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let bit = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n < 65_536 => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(b0, payload, true)
}

/// A server frame.
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
}

/// An upgraded connection spoken to byte by byte.
struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades with a bearer token for `user`, offering `protocol`.
    async fn connect(fleet: &Fleet, user: &str, protocol: &str) -> Result<RawWs> {
        let addr = fleet.edge.as_ref().context("edge")?.ws_addr;
        let mut stream = TcpStream::connect(addr).await?;
        let token = fleet.token(user, json!({}));
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {protocol}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = RawWs {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await?;
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        ws.buf.drain(..end);
        Ok(ws)
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .context("nothing from the server in time")??;
        if n == 0 {
            bail!("the server ended the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// The next frame from the server (servers never mask).
    async fn next(&mut self) -> Result<ServerFrame> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                ensure!(b1 & 0x80 == 0, "a masked server frame");
                let (len, at) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => (usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4),
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (usize::try_from(u64::from_be_bytes(b))?, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Ok(ServerFrame {
                        opcode: b0 & 0x0f,
                        payload,
                    });
                }
            }
            self.fill().await?;
        }
    }

    /// Reads until the server's close frame; returns its code and payload.
    async fn close(&mut self) -> Result<(u16, Vec<u8>)> {
        loop {
            let f = self.next().await?;
            if f.opcode == 0x8 {
                ensure!(f.payload.len() >= 2, "close without a code");
                ensure!(f.payload.len() <= 125, "close payload of {} bytes", f.payload.len());
                return Ok((u16::from_be_bytes([f.payload[0], f.payload[1]]), f.payload));
            }
        }
    }
}

/// Sends `bytes` on a fresh connection and returns the close code.
async fn close_code_for(fleet: &Fleet, user: &str, protocol: &str, bytes: &[u8]) -> Result<u16> {
    let mut ws = RawWs::connect(fleet, user, protocol).await?;
    ws.send(bytes).await?;
    Ok(ws.close().await?.0)
}

#[tokio::test]
async fn protocol_violations_close_with_1002() -> Result<()> {
    let fleet = Fleet::start().await?;
    let mut long_close = 1000u16.to_be_bytes().to_vec();
    long_close.extend_from_slice(&[b'x'; 200]);
    let ping = br#"{"op":"ping","id":1}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked data frame", frame_with(0x81, ping, false)),
        ("unmasked ping", frame_with(0x89, b"", false)),
        ("ping over 125 bytes", frame(0x89, &[b'p'; 126])),
        ("pong over 125 bytes", frame(0x8a, &[b'p'; 126])),
        ("close over 125 bytes", frame(0x88, &long_close)),
        ("fragmented ping", frame(0x09, b"p")),
        ("fragmented close", frame(0x08, &1000u16.to_be_bytes())),
        ("RSV1 without an extension", frame(0xc1, ping)),
        ("RSV3 without an extension", frame(0x91, ping)),
        ("unknown data opcode", frame(0x83, ping)),
        ("unknown control opcode", frame(0x8c, b"")),
        ("continuation without a start", frame(0x80, ping)),
        ("unfinished continuation without a start", frame(0x00, ping)),
        (
            "new unfinished data frame inside a fragmented message",
            [frame(0x01, b"{"), frame(0x01, b"{")].concat(),
        ),
        (
            "new final data frame inside a fragmented message",
            [frame(0x01, b"{"), frame(0x81, ping)].concat(),
        ),
        ("close with a 1-byte payload", frame(0x88, &[0x03])),
        ("close code 1005 (may not be sent)", frame(0x88, &1005u16.to_be_bytes())),
        ("close code 2999 (unassigned)", frame(0x88, &2999u16.to_be_bytes())),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        for protocol in ["switchyard.v1.json", "switchyard.v1.msgpack"] {
            let code = close_code_for(&fleet, &format!("u{i}"), protocol, bytes)
                .await
                .with_context(|| format!("{name} on {protocol}"))?;
            assert_eq!(code, 1002, "{name} on {protocol}");
        }
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_on_either_subprotocol() -> Result<()> {
    let fleet = Fleet::start().await?;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one text frame", frame(0x81, b"{\"op\":\"ping\xff\"}")),
        (
            "a fragmented text message",
            [
                frame(0x01, b"{\"op\":"),
                frame(0x00, b"\"pi\xc3"),
                frame(0x80, b"ng\"}"),
            ]
            .concat(),
        ),
        (
            "a truncated sequence at the end",
            [frame(0x01, b"{}"), frame(0x80, b"\xe2\x82")].concat(),
        ),
        ("a close reason", frame(0x88, &[0x03, 0xe8, 0xc3, 0x28])),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        for protocol in ["switchyard.v1.json", "switchyard.v1.msgpack"] {
            let code = close_code_for(&fleet, &format!("u{i}"), protocol, bytes)
                .await
                .with_context(|| format!("{name} on {protocol}"))?;
            assert_eq!(code, 1007, "{name} on {protocol}");
        }
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn fragments_pings_between_them_and_closes_follow_the_rules() -> Result<()> {
    let fleet = Fleet::start().await?;
    let mut ws = RawWs::connect(&fleet, "alice", "switchyard.v1.json").await?;
    // One op in three fragments ("é" split across two), a ping in between.
    let mut bytes = frame(0x01, br#"{"op":"ping","x":"caf"#);
    bytes.extend(frame(0x00, b"\xc3"));
    bytes.extend(frame(0x89, b"are you there"));
    bytes.extend(frame(0x80, b"\xa9\",\"id\":7}"));
    ws.send(&bytes).await?;
    let (mut pong, mut reply) = (None, None);
    while pong.is_none() || reply.is_none() {
        let f = ws.next().await?;
        match f.opcode {
            0xa => pong = Some(f.payload),
            0x1 => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload)?;
                if v["op"] == "pong" {
                    reply = Some(v);
                }
            }
            0x8 => bail!("closed: {:?}", f.payload),
            _ => {}
        }
    }
    assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));
    assert_eq!(reply.context("reply")?["id"], 7);
    // A valid close is echoed as it came.
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice("bye ✓".as_bytes());
    ws.send(&frame(0x88, &close)).await?;
    assert_eq!(ws.close().await?, (1000, close));
    fleet.shutdown().await;
    Ok(())
}
