//! The read side of a server WebSocket connection (RFC 6455 frames), with
//! no buffer while the connection is idle.
//!
//! fastwebsockets' reader keeps an 8 KiB buffer per connection for its whole
//! life; with 100,000 mostly idle connections that alone is 800 MiB. This
//! reader holds the frame header in a 14-byte array inside itself and
//! allocates a payload buffer only for a frame that is arriving, of exactly
//! its size, handed to the caller. It applies the same checks fastwebsockets
//! applies on the server side (reserved bits, opcodes, fragmented or
//! oversized control frames, close codes and UTF-8, the message size limit)
//! and reports them with fastwebsockets' error type, so the session treats
//! both alike. Reading is cancel-safe: progress lives in the reader, not in
//! the future.
//!
//! It does not write: pings and closes come back as [`Obligation`]s for the
//! connection's writer.

use fastwebsockets::{OpCode, WebSocketError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// One frame from the client, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct InFrame {
    /// Last fragment of its message.
    pub fin: bool,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A frame the protocol obliges the server to send back.
#[derive(Debug, PartialEq, Eq)]
pub enum Obligation {
    /// Answer a ping with this payload.
    Pong(Vec<u8>),
    /// Echo a close with this payload (code and reason).
    CloseEcho(Vec<u8>),
}

/// What [`FrameReader::read_frame`] produced: a frame for the caller (pings
/// never come out: they become a pong obligation) and what must be sent
/// back first. Both `None` does not happen.
pub type Read = (Option<InFrame>, Option<Obligation>);

/// Reads frames from `S` with no buffer between frames.
pub struct FrameReader<S> {
    stream: S,
    max_message_size: usize,
    header: [u8; MAX_HEADER],
    have: u8,
    /// Payload of the frame being read (allocated once its length is known).
    payload: Vec<u8>,
    /// Header of the frame whose payload is being read.
    pending: Option<Pending>,
    /// An error that must follow an obligation already handed out.
    deferred: Option<WebSocketError>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    len: usize,
}

fn opcode(b: u8) -> Result<OpCode, WebSocketError> {
    Ok(match b {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        _ => return Err(WebSocketError::InvalidValue),
    })
}

fn is_control(op: OpCode) -> bool {
    matches!(op, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

/// Close codes a peer may send (RFC 6455 7.4; the set fastwebsockets allows).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

impl<S: AsyncRead + Unpin> FrameReader<S> {
    /// A reader refusing messages of `max_message_size` bytes or more.
    pub fn new(stream: S, max_message_size: usize) -> FrameReader<S> {
        FrameReader {
            stream,
            max_message_size,
            header: [0; MAX_HEADER],
            have: 0,
            payload: Vec::new(),
            pending: None,
            deferred: None,
        }
    }

    /// Reads until `n` header bytes are in.
    async fn header_bytes(&mut self, n: usize) -> Result<(), WebSocketError> {
        while usize::from(self.have) < n {
            let got = self.stream.read(&mut self.header[usize::from(self.have)..n]).await?;
            if got == 0 {
                return Err(WebSocketError::UnexpectedEOF);
            }
            self.have += got as u8;
        }
        Ok(())
    }

    /// Reads the next frame (or the obligation a ping creates).
    pub async fn read_frame(&mut self) -> Result<Read, WebSocketError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let p = match self.pending {
            Some(p) => p,
            None => {
                self.header_bytes(2).await?;
                let (b0, b1) = (self.header[0], self.header[1]);
                if b0 & 0b0111_0000 != 0 {
                    return Err(WebSocketError::ReservedBitsNotZero);
                }
                let fin = b0 & 0b1000_0000 != 0;
                let op = opcode(b0 & 0x0f)?;
                let masked = b1 & 0x80 != 0;
                let extra = match b1 & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask_at = 2 + extra;
                self.header_bytes(mask_at + if masked { 4 } else { 0 }).await?;
                let len = match extra {
                    0 => usize::from(b1 & 0x7f),
                    2 => usize::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    _ => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.header[2..10]);
                        usize::try_from(u64::from_be_bytes(b)).map_err(|_| WebSocketError::FrameTooLarge)?
                    }
                };
                let mask = masked.then(|| {
                    let mut m = [0u8; 4];
                    m.copy_from_slice(&self.header[mask_at..mask_at + 4]);
                    m
                });
                self.have = 0;
                if is_control(op) && !fin {
                    return Err(WebSocketError::ControlFrameFragmented);
                }
                if op == OpCode::Ping && len > 125 {
                    return Err(WebSocketError::PingFrameTooLarge);
                }
                if len >= self.max_message_size {
                    return Err(WebSocketError::FrameTooLarge);
                }
                let p = Pending {
                    fin,
                    opcode: op,
                    mask,
                    len,
                };
                self.payload = Vec::with_capacity(len);
                self.pending = Some(p);
                p
            }
        };
        while self.payload.len() < p.len {
            let got = (&mut self.stream)
                .take((p.len - self.payload.len()) as u64)
                .read_buf(&mut self.payload)
                .await?;
            if got == 0 {
                return Err(WebSocketError::UnexpectedEOF);
            }
        }
        self.pending = None;
        let mut payload = std::mem::take(&mut self.payload);
        if let Some(mask) = p.mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
        }
        match p.opcode {
            OpCode::Ping => Ok((None, Some(Obligation::Pong(payload)))),
            OpCode::Close => {
                match payload.len() {
                    0 => {}
                    1 => return Err(WebSocketError::InvalidCloseFrame),
                    _ => {
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            return Err(WebSocketError::InvalidUTF8);
                        }
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code_allowed(code) {
                            let mut reply = 1002u16.to_be_bytes().to_vec();
                            reply.extend_from_slice(&payload[2..]);
                            // The error comes on the next call, after the reply is sent.
                            self.deferred = Some(WebSocketError::InvalidCloseCode);
                            return Ok((None, Some(Obligation::CloseEcho(reply))));
                        }
                    }
                }
                let echo = Obligation::CloseEcho(payload.clone());
                Ok((
                    Some(InFrame {
                        fin: true,
                        opcode: OpCode::Close,
                        payload,
                    }),
                    Some(echo),
                ))
            }
            OpCode::Text if p.fin && std::str::from_utf8(&payload).is_err() => Err(WebSocketError::InvalidUTF8),
            op => Ok((
                Some(InFrame {
                    fin: p.fin,
                    opcode: op,
                    payload,
                }),
                None,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65_536 => {
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
        out
    }

    fn reader(bytes: Vec<u8>) -> FrameReader<std::io::Cursor<Vec<u8>>> {
        FrameReader::new(std::io::Cursor::new(bytes), 1 << 16)
    }

    #[tokio::test]
    async fn reads_masked_frames_of_every_length_form() {
        let big = vec![7u8; 70_000];
        let mut bytes = frame(0x82, b"hello");
        bytes.extend(frame(0x01, &[b'a'; 300]));
        bytes.extend(frame(0x80, b"end"));
        let mut r = FrameReader::new(std::io::Cursor::new(bytes), 1 << 20);
        let (f, o) = r.read_frame().await.unwrap();
        assert_eq!(
            f.unwrap(),
            InFrame {
                fin: true,
                opcode: OpCode::Binary,
                payload: b"hello".to_vec()
            }
        );
        assert!(o.is_none());
        let (f, _) = r.read_frame().await.unwrap();
        let f = f.unwrap();
        assert_eq!((f.fin, f.opcode, f.payload.len()), (false, OpCode::Text, 300));
        let (f, _) = r.read_frame().await.unwrap();
        assert_eq!(f.unwrap().opcode, OpCode::Continuation);
        assert!(matches!(r.read_frame().await, Err(WebSocketError::UnexpectedEOF)));
        let mut r = FrameReader::new(std::io::Cursor::new(frame(0x82, &big)), 1 << 20);
        assert_eq!(r.read_frame().await.unwrap().0.unwrap().payload, big);
    }

    #[tokio::test]
    async fn pings_become_pongs_and_closes_are_echoed() {
        let mut bytes = frame(0x89, b"p");
        bytes.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        let mut r = reader(bytes);
        assert_eq!(
            r.read_frame().await.unwrap(),
            (None, Some(Obligation::Pong(b"p".to_vec())))
        );
        let (f, o) = r.read_frame().await.unwrap();
        assert_eq!(f.unwrap().opcode, OpCode::Close);
        assert_eq!(o, Some(Obligation::CloseEcho(vec![0x03, 0xe8, b'b', b'y', b'e'])));
    }

    #[tokio::test]
    async fn a_forbidden_close_code_is_answered_with_1002_then_fails() {
        let mut r = reader(frame(0x88, &[0x03, 0xed])); // 1005 may not be sent
        assert_eq!(
            r.read_frame().await.unwrap(),
            (None, Some(Obligation::CloseEcho(vec![0x03, 0xea])))
        );
        assert!(matches!(r.read_frame().await, Err(WebSocketError::InvalidCloseCode)));
    }

    #[tokio::test]
    async fn refuses_what_the_protocol_forbids() {
        type Check = fn(&WebSocketError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (frame(0xc2, b"x"), |e| matches!(e, WebSocketError::ReservedBitsNotZero)),
            (frame(0x83, b"x"), |e| matches!(e, WebSocketError::InvalidValue)),
            (frame(0x09, b"x"), |e| {
                matches!(e, WebSocketError::ControlFrameFragmented)
            }),
            (frame(0x89, &[0; 126]), |e| {
                matches!(e, WebSocketError::PingFrameTooLarge)
            }),
            (frame(0x82, &[0; 1 << 16]), |e| {
                matches!(e, WebSocketError::FrameTooLarge)
            }),
            (frame(0x81, &[0xff, 0xfe]), |e| matches!(e, WebSocketError::InvalidUTF8)),
            (frame(0x88, &[0x03]), |e| matches!(e, WebSocketError::InvalidCloseFrame)),
        ];
        for (bytes, want) in cases {
            let e = reader(bytes.clone()).read_frame().await.unwrap_err();
            assert!(want(&e), "{bytes:x?}: {e:?}");
        }
    }

    #[tokio::test]
    async fn holds_no_buffer_between_frames() {
        let mut r = reader(frame(0x82, &[1; 1000]));
        r.read_frame().await.unwrap();
        assert_eq!(r.payload.capacity(), 0);
    }
}
