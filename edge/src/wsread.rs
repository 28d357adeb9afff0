//! The read side of a server WebSocket connection (RFC 6455): frames in,
//! whole messages out, with no buffer while the connection is idle.
//!
//! fastwebsockets' reader keeps an 8 KiB buffer per connection for its whole
//! life; with 100,000 mostly idle connections that alone is 800 MiB. This
//! reader holds the frame header in a 14-byte array inside itself and
//! allocates only for bytes that have arrived: a payload buffer grows as the
//! payload comes in (never to more than twice what arrived plus one 4 KiB
//! chunk, never beyond the declared length), so a header that announces
//! 64 KiB and then goes quiet pins nothing.
//!
//! It owns every RFC 6455 rule on client frames and on message assembly:
//! masking, reserved bits, opcodes, control frames (at most 125 bytes, never
//! fragmented, allowed between fragments), fragment order, UTF-8 of text
//! messages and close reasons, close codes, and the message size limit.
//! With permessage-deflate negotiated ([`MessageReader::with_deflate`]),
//! RSV1 on the first frame of a data message marks it compressed: the
//! whole message is inflated ([`crate::deflate::codec::inflate`]) within
//! the same size limit before the UTF-8 check. A
//! breach comes back as a [`ReadError`] that names the close code to answer
//! with ([`ReadError::close`]); the caller only sends that close.
//!
//! Reading is cancel-safe: all progress lives in the reader, not in the
//! future. It does not write: pings and closes come back as
//! [`Incoming`] items for the connection's writer to answer.

use fastwebsockets::OpCode;

use crate::deflate::InflateError;
use switchyard_common::CloseCode;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// Most payload bytes asked of the socket at once beyond what already arrived.
const CHUNK: usize = 4096;

/// Longest payload of a control frame (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// What the client sent, one complete item at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole data message: `OpCode::Text` (then valid UTF-8) or
    /// `OpCode::Binary`, fragments already joined.
    Message(OpCode, Vec<u8>),
    /// A ping: answer with a pong carrying this payload (at most 125 bytes).
    Ping(Vec<u8>),
    /// A pong (its payload is of no use and is dropped).
    Pong,
    /// A valid close: echo this payload (at most 125 bytes) and stop reading.
    Close(Vec<u8>),
}

/// A breach of RFC 6455 by the client; always answered with close 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A client frame without a mask.
    Unmasked,
    /// A reserved bit set that no negotiated extension defines: any of
    /// them without permessage-deflate; with it, RSV2 or RSV3, or RSV1 on a
    /// control frame or a continuation frame.
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    UnknownOpcode(u8),
    /// A close, ping or pong without FIN.
    FragmentedControl,
    /// A close, ping or pong with more than 125 bytes of payload.
    ControlTooLong,
    /// A continuation frame with no fragmented message to continue.
    OrphanContinuation,
    /// A text or binary frame while a fragmented message is unfinished.
    InterleavedData,
    /// A close frame with a payload of one byte (a code needs two).
    ShortClose,
    /// A close code a peer may not send (1005, 1006, 1015, unassigned ones).
    ForbiddenCloseCode(u16),
}

impl Violation {
    /// The reason sent in the close frame (short, fixed: no allocation).
    pub fn reason(self) -> &'static str {
        match self {
            Violation::Unmasked => "client frame without a mask",
            Violation::ReservedBits => "reserved bits set",
            Violation::UnknownOpcode(_) => "unknown opcode",
            Violation::FragmentedControl => "fragmented control frame",
            Violation::ControlTooLong => "control frame over 125 bytes",
            Violation::OrphanContinuation => "continuation without a start",
            Violation::InterleavedData => "new data frame inside a fragmented message",
            Violation::ShortClose => "close payload of one byte",
            Violation::ForbiddenCloseCode(_) => "close code not allowed",
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            Violation::ForbiddenCloseCode(code) => write!(f, "close code {code} not allowed"),
            v => f.write_str(v.reason()),
        }
    }
}

impl std::error::Error for Violation {}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The socket ended without a close frame.
    #[error("connection ended without a close frame")]
    Eof,
    /// The client broke RFC 6455.
    #[error("protocol violation: {0}")]
    Protocol(Violation),
    /// A text message or a close reason that is not valid UTF-8.
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    /// A compressed message that is not valid deflate data.
    #[error("invalid compressed data in a permessage-deflate message")]
    InvalidCompressed,
    /// A message (all its fragments together, or inflated) over the size limit.
    #[error("message over {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

impl ReadError {
    /// The close frame to answer with (code, reason), or `None` when the
    /// socket is gone and nothing can be sent.
    pub fn close(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Io(_) | ReadError::Eof => None,
            ReadError::Protocol(v) => Some((CloseCode::ProtocolError.code(), v.reason())),
            ReadError::InvalidUtf8 => Some((CloseCode::InvalidPayload.code(), "invalid UTF-8")),
            // RFC 7692 names no code; 1007 is RFC 6455's "data not consistent
            // with the type of the message", as for bad UTF-8.
            ReadError::InvalidCompressed => Some((CloseCode::InvalidPayload.code(), "invalid compressed data")),
            ReadError::TooLarge { .. } => Some((CloseCode::PolicyViolation.code(), "frame too large")),
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Io(_) => "io",
            ReadError::Eof => "eof",
            ReadError::Protocol(_) => "protocol_error",
            ReadError::InvalidUtf8 => "invalid_utf8",
            ReadError::InvalidCompressed => "invalid_deflate",
            ReadError::TooLarge { .. } => "frame_too_large",
        }
    }
}

/// The header of the frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    len: usize,
    /// Where its payload starts in its buffer (data frames append to the
    /// message; control frames have their own buffer).
    start: usize,
}

fn opcode(b: u8) -> Result<OpCode, Violation> {
    Ok(match b {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        _ => return Err(Violation::UnknownOpcode(b)),
    })
}

fn is_control(op: OpCode) -> bool {
    matches!(op, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

/// Close codes a peer may send (RFC 6455 7.4 and the IANA registry).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Reads whole messages from `S`, holding no buffer between them.
pub struct MessageReader<S> {
    stream: S,
    /// Largest message allowed, in bytes (fragments together).
    max_message: usize,
    header: [u8; MAX_HEADER],
    have: u8,
    /// The frame whose payload is being read.
    head: Option<Head>,
    /// The kind (text or binary) of the data message being assembled.
    message_kind: Option<OpCode>,
    /// The data message being assembled: earlier fragments and the
    /// current data frame's payload so far.
    message: Vec<u8>,
    /// The current control frame's payload so far.
    control: Vec<u8>,
    /// permessage-deflate was negotiated: RSV1 may mark a data message compressed.
    deflate: bool,
    /// The data message being assembled is compressed.
    compressed: bool,
}

impl<S: AsyncRead + Unpin> MessageReader<S> {
    /// A reader allowing messages of up to `max_message` bytes.
    pub fn new(stream: S, max_message: usize) -> MessageReader<S> {
        MessageReader {
            stream,
            max_message,
            header: [0; MAX_HEADER],
            have: 0,
            head: None,
            message_kind: None,
            message: Vec::new(),
            control: Vec::new(),
            deflate: false,
            compressed: false,
        }
    }

    /// Accepts compressed messages (permessage-deflate was negotiated).
    pub fn with_deflate(mut self, deflate: bool) -> MessageReader<S> {
        self.deflate = deflate;
        self
    }

    /// Bytes of memory held for input that has not made a whole message yet.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.message.capacity() + self.control.capacity()
    }

    /// Reads until `n` header bytes are in.
    async fn header_bytes(&mut self, n: usize) -> Result<(), ReadError> {
        while usize::from(self.have) < n {
            let got = self.stream.read(&mut self.header[usize::from(self.have)..n]).await?;
            if got == 0 {
                return Err(ReadError::Eof);
            }
            self.have += got as u8;
        }
        Ok(())
    }

    /// Reads a frame header and checks it against every rule that can be
    /// checked before the payload.
    async fn read_head(&mut self) -> Result<Head, ReadError> {
        self.header_bytes(2).await?;
        let (b0, b1) = (self.header[0], self.header[1]);
        let op = opcode(b0 & 0x0f).map_err(ReadError::Protocol)?;
        let rsv = b0 & 0b0111_0000;
        // RSV1 starts a compressed message (RFC 7692 §6): only on the first
        // frame of a data message, and only once deflate was negotiated.
        let starts_compressed =
            rsv == crate::wsframe::RSV1 && self.deflate && matches!(op, OpCode::Text | OpCode::Binary);
        if rsv != 0 && !starts_compressed {
            return Err(ReadError::Protocol(Violation::ReservedBits));
        }
        let fin = b0 & 0b1000_0000 != 0;
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol(Violation::Unmasked));
        }
        let short_len = b1 & 0x7f;
        if is_control(op) {
            if !fin {
                return Err(ReadError::Protocol(Violation::FragmentedControl));
            }
            if usize::from(short_len) > MAX_CONTROL {
                return Err(ReadError::Protocol(Violation::ControlTooLong));
            }
        } else {
            match (op, self.message_kind) {
                (OpCode::Continuation, None) => return Err(ReadError::Protocol(Violation::OrphanContinuation)),
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return Err(ReadError::Protocol(Violation::InterleavedData))
                }
                _ => {}
            }
        }
        let extra = match short_len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask_at = 2 + extra;
        self.header_bytes(mask_at + 4).await?;
        let len = match extra {
            0 => u64::from(short_len),
            2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            _ => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&self.header[mask_at..mask_at + 4]);
        self.have = 0;
        let start = if is_control(op) { 0 } else { self.message.len() };
        let too_large = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .is_none_or(|total| total > self.max_message);
        if too_large {
            return Err(ReadError::TooLarge {
                limit: self.max_message,
            });
        }
        if op == OpCode::Text || op == OpCode::Binary {
            self.message_kind = Some(op);
            self.compressed = starts_compressed;
        }
        Ok(Head {
            fin,
            opcode: op,
            mask,
            len: len as usize,
            start,
        })
    }

    /// Reads until a whole message, a ping, a pong or a valid close is in.
    ///
    /// Cancel-safe: dropping the future loses nothing; the next call goes on
    /// where this one stopped.
    pub async fn read_message(&mut self) -> Result<Incoming, ReadError> {
        loop {
            let head = match self.head {
                Some(h) => h,
                None => {
                    let h = self.read_head().await?;
                    self.head = Some(h);
                    h
                }
            };
            let buf = if is_control(head.opcode) {
                &mut self.control
            } else {
                &mut self.message
            };
            let end = head.start + head.len;
            while buf.len() < end {
                let want = end - buf.len();
                if buf.capacity() == buf.len() {
                    // Grow with what arrives: at most doubling what is
                    // already here (or one chunk), never past the frame.
                    buf.reserve_exact(want.min(CHUNK.max(buf.len())));
                }
                let got = (&mut self.stream).take(want as u64).read_buf(buf).await?;
                if got == 0 {
                    return Err(ReadError::Eof);
                }
            }
            self.head = None;
            for (i, b) in buf[head.start..end].iter_mut().enumerate() {
                *b ^= head.mask[i & 3];
            }
            match head.opcode {
                OpCode::Ping => return Ok(Incoming::Ping(std::mem::take(&mut self.control))),
                OpCode::Pong => {
                    self.control = Vec::new();
                    return Ok(Incoming::Pong);
                }
                OpCode::Close => return check_close(std::mem::take(&mut self.control)),
                _ if !head.fin => continue,
                _ => {
                    let kind = self.message_kind.take().unwrap_or(OpCode::Binary);
                    let mut message = std::mem::take(&mut self.message);
                    if std::mem::take(&mut self.compressed) {
                        message = crate::deflate::codec::inflate(&message, self.max_message).map_err(|e| match e {
                            InflateError::Invalid => ReadError::InvalidCompressed,
                            InflateError::TooLarge { limit } => ReadError::TooLarge { limit },
                        })?;
                    }
                    if kind == OpCode::Text && std::str::from_utf8(&message).is_err() {
                        return Err(ReadError::InvalidUtf8);
                    }
                    return Ok(Incoming::Message(kind, message));
                }
            }
        }
    }
}

/// A close payload: empty, or a code a peer may send and a UTF-8 reason.
fn check_close(payload: Vec<u8>) -> Result<Incoming, ReadError> {
    match payload.len() {
        0 => {}
        1 => return Err(ReadError::Protocol(Violation::ShortClose)),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(ReadError::Protocol(Violation::ForbiddenCloseCode(code)));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
        }
    }
    Ok(Incoming::Close(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::io::AsyncWriteExt;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// A frame header as a client writes it: masked with `MASK`, the
    /// shortest length form.
    fn head(b0: u8, len: usize) -> Vec<u8> {
        let mut out = vec![b0];
        match len {
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
        out.extend_from_slice(&MASK);
        out
    }

    /// A client frame: masked with `MASK`.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = head(b0, payload.len());
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
        out
    }

    fn reader(bytes: Vec<u8>) -> MessageReader<std::io::Cursor<Vec<u8>>> {
        MessageReader::new(std::io::Cursor::new(bytes), 1 << 16)
    }

    fn close_code(e: &ReadError) -> Option<u16> {
        e.close().map(|(code, _)| code)
    }

    #[tokio::test]
    async fn reads_messages_of_every_length_form() {
        let big = vec![7u8; 70_000];
        let mut bytes = frame(0x82, b"hello");
        bytes.extend(frame(0x81, &[b'a'; 300]));
        bytes.extend(frame(0x82, &big));
        let mut r = MessageReader::new(std::io::Cursor::new(bytes), 1 << 20);
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Binary, b"hello".to_vec())
        );
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Text, vec![b'a'; 300])
        );
        assert_eq!(r.read_message().await.unwrap(), Incoming::Message(OpCode::Binary, big));
        assert!(matches!(r.read_message().await, Err(ReadError::Eof)));
    }

    #[tokio::test]
    async fn joins_fragments_with_control_frames_between_them() {
        // "é" is split across the two text fragments: valid once joined.
        let mut bytes = frame(0x01, b"caf\xc3");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x00, b"\xa9 "));
        bytes.extend(frame(0x8a, b"q"));
        bytes.extend(frame(0x80, b"ok"));
        let mut r = reader(bytes);
        assert_eq!(r.read_message().await.unwrap(), Incoming::Ping(b"p".to_vec()));
        assert_eq!(r.read_message().await.unwrap(), Incoming::Pong);
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Text, "café ok".as_bytes().to_vec())
        );
        assert_eq!(r.held(), 0, "nothing kept between messages");
    }

    #[tokio::test]
    async fn closes_are_checked_and_handed_back_for_the_echo() {
        let mut r = reader(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Close(vec![0x03, 0xe8, b'b', b'y', b'e'])
        );
        assert_eq!(
            reader(frame(0x88, b"")).read_message().await.unwrap(),
            Incoming::Close(vec![])
        );
    }

    #[tokio::test]
    async fn every_breach_names_its_close_code() {
        let mut long_close = vec![0x03, 0xe8];
        long_close.extend_from_slice(&[b'x'; 124]);
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unmasked", vec![0x82, 0x01, b'x'], 1002),
            ("reserved bit 1", frame(0xc2, b"x"), 1002),
            ("reserved bit 3", frame(0x92, b"x"), 1002),
            ("unknown data opcode", frame(0x83, b"x"), 1002),
            ("unknown control opcode", frame(0x8b, b"x"), 1002),
            ("fragmented ping", frame(0x09, b"x"), 1002),
            ("fragmented close", frame(0x08, &[0x03, 0xe8]), 1002),
            ("ping over 125", frame(0x89, &[0; 126]), 1002),
            ("pong over 125", frame(0x8a, &[0; 126]), 1002),
            ("close over 125", frame(0x88, &long_close), 1002),
            ("continuation without a start", frame(0x80, b"x"), 1002),
            ("fragmented continuation without a start", frame(0x00, b"x"), 1002),
            (
                "text inside a fragmented message",
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                1002,
            ),
            (
                "binary inside a fragmented message",
                [frame(0x02, b"a"), frame(0x02, b"b")].concat(),
                1002,
            ),
            ("close of one byte", frame(0x88, &[0x03]), 1002),
            ("close code 1005", frame(0x88, &[0x03, 0xed]), 1002),
            ("close code 999", frame(0x88, &[0x03, 0xe7]), 1002),
            ("close code 5000", frame(0x88, &[0x13, 0x88]), 1002),
            ("bad UTF-8 close reason", frame(0x88, &[0x03, 0xe8, 0xff]), 1007),
            ("bad UTF-8 text", frame(0x81, &[0xff, 0xfe]), 1007),
            (
                "bad UTF-8 fragmented text",
                [frame(0x01, b"ok"), frame(0x80, &[0xc3])].concat(),
                1007,
            ),
            ("over the size limit", frame(0x82, &[0; (1 << 16) + 1]), 4008),
            (
                "fragments over the size limit",
                [frame(0x02, &[0; 40_000]), frame(0x80, &[0; 40_000])].concat(),
                4008,
            ),
            (
                "64-bit length past usize",
                [vec![0x82, 0xff], vec![0xff; 8], MASK.to_vec()].concat(),
                4008,
            ),
        ];
        for (name, bytes, want) in cases {
            let e = reader(bytes).read_message().await.unwrap_err();
            assert_eq!(close_code(&e), Some(want), "{name}: {e:?}");
        }
        // Exactly at the limit is fine, in one frame or in fragments.
        let at = reader(frame(0x82, &[0; 1 << 16])).read_message().await.unwrap();
        assert!(matches!(at, Incoming::Message(OpCode::Binary, m) if m.len() == 1 << 16));
        let split = [frame(0x02, &[0; 1 << 15]), frame(0x80, &[0; 1 << 15])].concat();
        assert!(reader(split).read_message().await.is_ok());
    }

    /// "Hello" compressed, as in RFC 7692 §7.2.3.1 (tail cut).
    const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    fn deflating(bytes: Vec<u8>) -> MessageReader<std::io::Cursor<Vec<u8>>> {
        reader(bytes).with_deflate(true)
    }

    #[tokio::test]
    async fn with_deflate_rsv1_marks_a_compressed_message() {
        let mut bytes = frame(0xc1, &HELLO);
        bytes.extend(frame(0x82, b"plain"));
        // Fragmented: RSV1 on the first frame only, a ping between.
        bytes.extend(frame(0x42, &HELLO[..3]));
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, &HELLO[3..]));
        let mut r = deflating(bytes);
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Text, b"Hello".to_vec())
        );
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Binary, b"plain".to_vec())
        );
        assert_eq!(r.read_message().await.unwrap(), Incoming::Ping(b"p".to_vec()));
        assert_eq!(
            r.read_message().await.unwrap(),
            Incoming::Message(OpCode::Binary, b"Hello".to_vec())
        );
        assert_eq!(r.held(), 0);
    }

    #[tokio::test]
    async fn with_deflate_other_reserved_bits_and_bad_data_still_close() {
        let bomb = {
            use flate2::{Compress, Compression, FlushCompress};
            let mut c = Compress::new(Compression::best(), false);
            let mut v = Vec::with_capacity(1 << 16);
            c.compress_vec(&vec![b'a'; 8 << 20], &mut v, FlushCompress::Sync)
                .unwrap();
            v.truncate(v.len() - 4);
            v
        };
        assert!(bomb.len() < 1 << 16, "the bomb itself fits the frame limit");
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("RSV1 on a ping", frame(0xc9, b"x"), 1002),
            ("RSV1 on a close", frame(0xc8, &[0x03, 0xe8]), 1002),
            (
                "RSV1 on a continuation",
                [frame(0x42, &HELLO[..3]), frame(0xc0, &HELLO[3..])].concat(),
                1002,
            ),
            ("RSV2", frame(0xa2, b"x"), 1002),
            ("RSV3", frame(0x92, b"x"), 1002),
            ("RSV1 and RSV2", frame(0xe2, &HELLO), 1002),
            ("invalid deflate data", frame(0xc2, &[0xff, 0xff, 0xff]), 1007),
            (
                "compressed text that is not UTF-8",
                frame(0xc1, &[0x00, 0x02, 0x00, 0xfd, 0xff, 0xff, 0xfe]),
                1007,
            ),
            ("a bomb", frame(0xc2, &bomb), 4008),
        ];
        for (name, bytes, want) in cases {
            let e = deflating(bytes).read_message().await.unwrap_err();
            assert_eq!(close_code(&e), Some(want), "{name}: {e:?}");
        }
        let e = reader(frame(0xc2, &HELLO)).read_message().await.unwrap_err();
        assert_eq!(close_code(&e), Some(1002), "RSV1 without deflate negotiated");
    }

    #[tokio::test]
    async fn close_codes_a_peer_may_send_are_accepted() {
        for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(b"why");
            let got = reader(frame(0x88, &payload)).read_message().await.unwrap();
            assert_eq!(got, Incoming::Close(payload), "{code}");
        }
    }

    #[tokio::test]
    async fn a_declared_length_pins_only_what_arrived() {
        let (mut client, server) = tokio::io::duplex(1 << 17);
        let mut r = MessageReader::new(server, 1 << 16);
        client.write_all(&head(0x82, 65_535)).await.unwrap();
        client.write_all(&[0; 10]).await.unwrap();
        assert!(r.read_message().now_or_never().is_none(), "no message yet");
        assert!(r.held() <= CHUNK, "held {} bytes for 10 that arrived", r.held());
        // As bytes arrive the buffer grows with them, not ahead of them.
        client.write_all(&[0; 20_000]).await.unwrap();
        assert!(r.read_message().now_or_never().is_none());
        assert!(r.held() <= 2 * 20_010 + CHUNK, "held {}", r.held());
        client.write_all(&[0; 65_535 - 20_010]).await.unwrap();
        let got = r.read_message().now_or_never().expect("whole message in").unwrap();
        assert!(matches!(got, Incoming::Message(OpCode::Binary, m) if m.len() == 65_535));
        assert_eq!(r.held(), 0);
    }

    #[tokio::test]
    async fn reading_is_cancel_safe_byte_by_byte() {
        let mut bytes = frame(0x01, b"hel");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, b"lo"));
        let (mut client, server) = tokio::io::duplex(1 << 10);
        let mut r = MessageReader::new(server, 1 << 16);
        let mut got = Vec::new();
        for b in bytes {
            client.write_all(&[b]).await.unwrap();
            if let Some(item) = r.read_message().now_or_never() {
                got.push(item.unwrap());
            }
        }
        assert_eq!(
            got,
            vec![
                Incoming::Ping(b"p".to_vec()),
                Incoming::Message(OpCode::Text, b"hello".to_vec())
            ]
        );
    }
}
