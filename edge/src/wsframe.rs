//! Server frames of RFC 6455, written straight into a connection's byte
//! buffer.
//!
//! A server frame is a 2 to 10 byte header (never masked) before the
//! payload. Owning this lets a connection keep every frame it has not yet
//! sent as plain bytes, which anyone holding the connection's lock (its own
//! task, or the live dispatcher writing at once) can push to the socket
//! without waiting: fastwebsockets' writer needs an `.await` per frame.

/// A text frame (JSON connections).
pub const TEXT: u8 = 0x1;
/// A binary frame (MessagePack connections).
pub const BINARY: u8 = 0x2;
/// A close frame.
pub const CLOSE: u8 = 0x8;
/// A ping frame.
pub const PING: u8 = 0x9;
/// A pong frame.
pub const PONG: u8 = 0xA;

/// The first reserved bit: set on the first frame of a compressed message
/// (permessage-deflate, RFC 7692), see [`crate::deflate`].
pub const RSV1: u8 = 0x40;

/// The longest header of a server frame.
pub const MAX_HEADER: usize = 10;

/// The length of the header of a frame carrying `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    }
}

/// Writes the header of a frame starting with `first` (FIN, RSV bits,
/// opcode) and carrying `len` bytes into `out`; returns its length.
pub fn write_header(first: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = first;
    match header_len(len) {
        2 => out[1] = len as u8,
        4 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
    header_len(len)
}

/// Appends the header of a final (unfragmented) frame of `opcode` carrying `len` bytes.
pub fn put_header(buf: &mut Vec<u8>, opcode: u8, len: usize) {
    buf.push(0x80 | opcode);
    if len < 126 {
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a whole frame.
pub fn put_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    buf.reserve(MAX_HEADER + payload.len());
    put_header(buf, opcode, payload.len());
    buf.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason`, the reason cut (at a
/// character boundary) so the payload stays within the 125 bytes a control
/// frame may carry.
pub fn put_close(buf: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    put_header(buf, CLOSE, 2 + end);
    buf.extend_from_slice(&code.to_be_bytes());
    buf.extend_from_slice(&reason.as_bytes()[..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_take_the_shortest_encoding() {
        for (len, head) in [
            (0usize, vec![0x82, 0]),
            (125, vec![0x82, 125]),
            (126, vec![0x82, 126, 0, 126]),
            (65535, vec![0x82, 126, 0xff, 0xff]),
            (65536, vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let mut buf = Vec::new();
            put_header(&mut buf, BINARY, len);
            assert_eq!(buf, head, "{len}");
        }
    }

    #[test]
    fn a_frame_is_its_header_then_its_payload() {
        let mut buf = Vec::new();
        put_frame(&mut buf, TEXT, b"hi");
        put_frame(&mut buf, PONG, b"");
        assert_eq!(buf, [0x81, 2, b'h', b'i', 0x8A, 0]);
    }

    #[test]
    fn close_reasons_stay_within_a_control_frame() {
        let mut buf = Vec::new();
        put_close(&mut buf, 4009, "slow consumer");
        assert_eq!(&buf[..4], [0x88, 15, 0x0f, 0xa9]);
        assert_eq!(&buf[4..], b"slow consumer");
        let long = "é".repeat(100);
        let mut buf = Vec::new();
        put_close(&mut buf, 1000, &long);
        assert!(buf[1] as usize <= 125);
        assert_eq!(buf.len(), 2 + buf[1] as usize);
        assert!(std::str::from_utf8(&buf[4..]).is_ok(), "cut at a character boundary");
    }
}
