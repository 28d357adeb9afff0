//! Compressing and inflating message payloads (RFC 7692 §7.2): raw
//! deflate, each message ended with a sync flush whose `00 00 ff ff` tail
//! is cut on the way out and put back on the way in.
//!
//! Without context takeover (the default) the compressor and the
//! decompressor are per thread, reset for every message: nothing lives in
//! the connection. With context takeover the connection owns its
//! compressor ([`FrameDeflater`]). Inflating is always per thread: clients
//! are told `client_no_context_takeover`.
//!
//! Frames are compressed straight into the connection's wire buffer,
//! behind room left for the header: no buffer per message.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::offer::Agreed;
use super::settings::DeflateSettings;
use crate::wsframe;

/// What a sync flush ends with, and what RFC 7692 §7.2.1 cuts off.
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output room asked for at once while inflating.
const INFLATE_CHUNK: usize = 4096;

thread_local! {
    /// Compressors without context, one per window size (9 to 15 bits),
    /// created on first use and reset before each message.
    static COMPRESSORS: RefCell<[Option<(u32, Compress)>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
    /// The decompressor, reset before each message.
    static DECOMPRESSOR: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The outgoing side of permessage-deflate on one connection.
///
/// Without context takeover it holds only the agreed numbers; with it, the
/// connection's compressor (created on the first compressed frame).
#[derive(Debug)]
pub struct FrameDeflater {
    /// The connection's compressor, with context takeover only.
    own: Option<Box<Compress>>,
    takeover: bool,
    min_bytes: u32,
    level: u8,
    window_bits: u8,
}

impl FrameDeflater {
    /// The deflater for a connection that agreed to `agreed`.
    pub fn new(agreed: &Agreed, settings: &DeflateSettings) -> FrameDeflater {
        FrameDeflater {
            own: None,
            takeover: !agreed.server_no_context_takeover,
            min_bytes: u32::try_from(settings.min_bytes).unwrap_or(u32::MAX),
            level: settings.level.clamp(1, 9) as u8,
            window_bits: agreed.server_window_bits.clamp(9, 15),
        }
    }

    fn new_compressor(&self) -> Compress {
        Compress::new_with_window_bits(Compression::new(u32::from(self.level)), false, self.window_bits)
    }

    /// Appends `payload` as one compressed frame (RSV1 set); false, with
    /// nothing appended, when compressing would not make it smaller.
    fn put_compressed(&mut self, buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) -> bool {
        if self.takeover {
            let level = self.level;
            let bits = self.window_bits;
            let c = self.own.get_or_insert_with(|| {
                Box::new(Compress::new_with_window_bits(
                    Compression::new(u32::from(level)),
                    false,
                    bits,
                ))
            });
            let done = compress_frame(c, buf, opcode, payload).is_some();
            if !done {
                // The window now holds bytes the client never saw: start over.
                c.reset();
            }
            return done;
        }
        COMPRESSORS.with(|cell| {
            let mut all = cell.borrow_mut();
            let slot = &mut all[usize::from(self.window_bits - 9)];
            let level = u32::from(self.level);
            match slot {
                Some((l, c)) if *l == level => c.reset(),
                _ => *slot = Some((level, self.new_compressor())),
            }
            let (_, c) = slot.as_mut().expect("just filled");
            compress_frame(c, buf, opcode, payload).is_some()
        })
    }
}

/// Appends `payload` as one data frame of `opcode`: compressed when the
/// connection negotiated deflate, the payload is at least the minimum and
/// deflate makes it smaller; plain otherwise (RSV1 clear, which RFC 7692
/// allows for any message). The one place data frames are framed.
pub fn put_data_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8], deflater: Option<&mut FrameDeflater>) {
    if let Some(d) = deflater {
        if payload.len() >= d.min_bytes as usize {
            let before = buf.len();
            if d.put_compressed(buf, opcode, payload) {
                metrics::counter!("switchyard_edge_deflate_bytes_in_total").increment(payload.len() as u64);
                metrics::counter!("switchyard_edge_deflate_bytes_out_total").increment((buf.len() - before) as u64);
                return;
            }
            metrics::counter!("switchyard_edge_deflate_incompressible_total").increment(1);
        }
    }
    wsframe::put_frame(buf, opcode, payload);
}

/// Compresses `payload` with `c` (already reset, or carrying the context)
/// into `buf` as a whole frame: header with RSV1, then the deflate data
/// without its `00 00 ff ff` tail. Returns the compressed length, or
/// `None` (and `buf` as it was) when the result would not be smaller.
pub fn compress_frame(c: &mut Compress, buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) -> Option<usize> {
    let start = buf.len();
    // Room for the header an uncompressed payload needs (a smaller
    // payload never needs a longer one), then the deflate data.
    let head = wsframe::header_len(payload.len());
    let body = start + head;
    buf.reserve(head + payload.len() + TAIL.len() + 16);
    buf.resize(body, 0);
    let in_before = c.total_in();
    let result = c.compress_vec(payload, buf, FlushCompress::Sync);
    let whole = result.is_ok()
        && c.total_in() - in_before == payload.len() as u64
        // A full buffer may hide more of the flush.
        && buf.len() < buf.capacity()
        && buf[body..].ends_with(&TAIL);
    let n = buf.len().saturating_sub(body + TAIL.len());
    if !whole || n >= payload.len() {
        buf.truncate(start);
        return None;
    }
    buf.truncate(body + n);
    let mut header = [0u8; wsframe::MAX_HEADER];
    let h = wsframe::write_header(0x80 | wsframe::RSV1 | opcode, n, &mut header);
    if h < head {
        buf.copy_within(body.., start + h);
        buf.truncate(start + h + n);
    }
    buf[start..start + h].copy_from_slice(&header[..h]);
    Some(n)
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Not a valid deflate stream.
    #[error("invalid compressed data")]
    Invalid,
    /// It inflates to more than the message size limit.
    #[error("inflated message over {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// Inflates one compressed message (`00 00 ff ff` cut off) with the
/// thread's decompressor, reset first. The output grows in steps as data
/// comes out and never beyond `limit + 1` bytes: a small message that
/// inflates to gigabytes (a zip bomb) costs at most `limit` bytes of
/// memory and the time to inflate that much, then fails.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESSOR.with(|cell| {
        let mut d = cell.borrow_mut();
        d.reset(false);
        let mut out = Vec::new();
        inflate_into(&mut d, compressed, limit, &mut out)?;
        Ok(out)
    })
}

/// Inflates `compressed` and the tail into `out` with `d`; see [`inflate`].
pub fn inflate_into(
    d: &mut Decompress,
    compressed: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    let cap = limit.saturating_add(1);
    for (mut input, flush) in [(compressed, FlushDecompress::None), (&TAIL[..], FlushDecompress::Sync)] {
        loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Err(InflateError::TooLarge { limit });
                }
                let step = out.len().max(INFLATE_CHUNK).min(cap - out.len());
                out.reserve_exact(step);
            }
            let (in_before, out_before) = (d.total_in(), d.total_out());
            let status = d.decompress_vec(input, out, flush).map_err(|_| InflateError::Invalid)?;
            let used = (d.total_in() - in_before) as usize;
            input = &input[used..];
            if out.len() > limit {
                return Err(InflateError::TooLarge { limit });
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL): whatever follows is not deflate data.
                return Ok(());
            }
            let room_left = out.len() < out.capacity();
            if input.is_empty() && room_left {
                // All input taken, and output room left over: nothing is pending.
                break;
            }
            if used == 0 && d.total_out() == out_before && room_left {
                return Err(InflateError::Invalid);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(min_bytes: usize) -> DeflateSettings {
        DeflateSettings {
            min_bytes,
            ..DeflateSettings::default()
        }
    }

    fn agreed(header: &str, s: &DeflateSettings) -> Agreed {
        super::super::negotiate([header.as_bytes()], s).expect("accepted")
    }

    /// Splits one server frame: (first byte, payload).
    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let (len, at) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), at + len, "one whole frame");
        (frame[0], &frame[at..])
    }

    fn event(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(
                format!(
                    "{{\"op\":\"event\",\"type\":\"tick\",\"data\":{{\"seq\":{i},\"sym\":\"S{}\"}}}}",
                    i % 7
                )
                .as_bytes(),
            );
        }
        out
    }

    #[test]
    fn a_compressed_frame_has_rsv1_no_tail_and_inflates_back() {
        let s = settings(64);
        let mut d = FrameDeflater::new(&agreed("permessage-deflate", &s), &s);
        for payload in [event(2), event(50), event(2000)] {
            let mut buf = b"before".to_vec();
            put_data_frame(&mut buf, wsframe::BINARY, &payload, Some(&mut d));
            assert_eq!(&buf[..6], b"before", "appended after what was there");
            let (b0, body) = split(&buf[6..]);
            assert_eq!(b0, 0x80 | 0x40 | wsframe::BINARY, "FIN, RSV1, binary");
            assert!(
                body.len() < payload.len() * 2 / 3,
                "{} of {}",
                body.len(),
                payload.len()
            );
            assert!(!body.ends_with(&TAIL), "the sync flush tail is cut");
            assert_eq!(inflate(body, 1 << 20).unwrap(), payload);
        }
    }

    #[test]
    fn small_and_incompressible_payloads_go_plain() {
        let s = settings(256);
        let mut d = FrameDeflater::new(&agreed("permessage-deflate", &s), &s);
        let mut buf = Vec::new();
        put_data_frame(&mut buf, wsframe::TEXT, &event(2)[..100], Some(&mut d));
        assert_eq!(buf[0], 0x81, "under the minimum: RSV1 clear");
        // Bytes deflate cannot shrink (a xorshift stream).
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut buf = Vec::new();
        put_data_frame(&mut buf, wsframe::BINARY, &noise, Some(&mut d));
        let (b0, body) = split(&buf);
        assert_eq!((b0, body), (0x82, &noise[..]));
        let mut buf = Vec::new();
        put_data_frame(&mut buf, wsframe::BINARY, &event(50), None);
        assert_eq!(buf[0], 0x82, "no deflate negotiated");
    }

    #[test]
    fn empty_payloads_round_trip() {
        let mut c = Compress::new(Compression::fast(), false);
        let mut buf = Vec::new();
        assert_eq!(
            compress_frame(&mut c, &mut buf, wsframe::BINARY, b""),
            None,
            "never smaller"
        );
        assert!(buf.is_empty());
        // An empty compressed message (what another implementation may send) is empty.
        assert_eq!(inflate(&[], 100).unwrap(), b"");
        assert_eq!(inflate(&[0x00], 100).unwrap(), b"", "an empty stored block");
        assert_eq!(inflate(&[0x02, 0x00], 100).unwrap(), b"", "an empty fixed block");
    }

    #[test]
    fn the_rfc_7692_hello_example_inflates() {
        // RFC 7692 §7.2.3.1 and §7.2.3.3 (no compression: a stored block).
        assert_eq!(
            inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100).unwrap(),
            b"Hello"
        );
        assert_eq!(
            inflate(&[0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00], 100).unwrap(),
            b"Hello"
        );
        // With BFINAL set (§7.2.3.4), the tail is not needed.
        assert_eq!(
            inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100).unwrap(),
            b"Hello"
        );
    }

    #[test]
    fn without_takeover_every_message_compresses_alone_with_takeover_they_share() {
        let payload = event(20);
        let s = settings(1);
        let mut fresh = FrameDeflater::new(&agreed("permessage-deflate", &s), &s);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        put_data_frame(&mut a, wsframe::BINARY, &payload, Some(&mut fresh));
        put_data_frame(&mut b, wsframe::BINARY, &payload, Some(&mut fresh));
        assert_eq!(a, b, "no context: the same message compresses the same");
        let t = DeflateSettings {
            context_takeover: true,
            ..s
        };
        let mut own = FrameDeflater::new(&agreed("permessage-deflate", &t), &t);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        put_data_frame(&mut a, wsframe::BINARY, &payload, Some(&mut own));
        put_data_frame(&mut b, wsframe::BINARY, &payload, Some(&mut own));
        assert!(
            b.len() < a.len() / 2,
            "the second refers to the first: {} vs {}",
            b.len(),
            a.len()
        );
        // A client with one decompressor for the connection reads both.
        let mut d = Decompress::new(false);
        for (frame, want) in [(&a, &payload), (&b, &payload)] {
            let mut out = Vec::new();
            inflate_into(&mut d, split(frame).1, 1 << 20, &mut out).unwrap();
            assert_eq!(&out, want);
        }
    }

    #[test]
    fn a_small_window_is_honoured() {
        let s = settings(1);
        let a = agreed("permessage-deflate; server_max_window_bits=9", &s);
        assert_eq!(a.server_window_bits, 9);
        let mut d = FrameDeflater::new(&a, &s);
        let payload = event(300);
        let mut buf = Vec::new();
        put_data_frame(&mut buf, wsframe::BINARY, &payload, Some(&mut d));
        let body = split(&buf).1;
        let mut small = Decompress::new_with_window_bits(false, 9);
        let mut out = Vec::new();
        inflate_into(&mut small, body, 1 << 20, &mut out).unwrap();
        assert_eq!(out, payload);
    }

    proptest::proptest! {
        /// Whatever the payload, a frame either goes plain (and is the
        /// payload) or compressed (RSV1, smaller, and inflates back to it),
        /// with or without context takeover.
        #[test]
        fn every_frame_reads_back(
            chunks in proptest::collection::vec((proptest::collection::vec(0u8..4, 0..300), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)), 1..6),
            takeover in proptest::prelude::any::<bool>(),
        ) {
            let s = DeflateSettings { min_bytes: 1, context_takeover: takeover, ..DeflateSettings::default() };
            let mut d = FrameDeflater::new(&agreed("permessage-deflate", &s), &s);
            let mut client = Decompress::new(false);
            for (repetitive, noise) in &chunks {
                let payload: Vec<u8> = repetitive.iter().map(|b| b"abcd"[*b as usize]).chain(noise.iter().copied()).collect();
                let mut buf = Vec::new();
                put_data_frame(&mut buf, wsframe::TEXT, &payload, Some(&mut d));
                let (b0, body) = split(&buf);
                if b0 & wsframe::RSV1 == 0 {
                    proptest::prop_assert_eq!(body, &payload[..]);
                } else {
                    proptest::prop_assert!(body.len() < payload.len());
                    if !takeover {
                        client.reset(false);
                    }
                    let mut out = Vec::new();
                    inflate_into(&mut client, body, 1 << 16, &mut out).unwrap();
                    proptest::prop_assert_eq!(out, payload);
                }
            }
        }

        /// Arbitrary header text never panics the offer parser.
        #[test]
        fn any_offer_header_is_answered_or_declined(h in "[ -~]{0,80}") {
            let _ = super::super::negotiate([h.as_bytes()], &DeflateSettings::default());
        }
    }

    #[test]
    fn garbage_is_invalid() {
        for bad in [&[0xff, 0xff, 0xff, 0xff][..], &[0x07], &[0x06, 0x00, 0x00]] {
            assert_eq!(inflate(bad, 1 << 16), Err(InflateError::Invalid), "{bad:x?}");
        }
        // The thread's decompressor is fine afterwards.
        assert_eq!(
            inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100).unwrap(),
            b"Hello"
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 64 MiB of zeros deflates to about 64 KiB; inflating stops just past 64 KiB.
        let mut c = Compress::new(Compression::best(), false);
        let zeros = vec![0u8; 64 << 20];
        let mut bomb = Vec::with_capacity(1 << 20);
        c.compress_vec(&zeros, &mut bomb, FlushCompress::Sync).unwrap();
        assert!(bomb.ends_with(&TAIL));
        bomb.truncate(bomb.len() - 4);
        assert!(bomb.len() < 128 << 10, "{}", bomb.len());
        let mut d = Decompress::new(false);
        let mut out = Vec::new();
        assert_eq!(
            inflate_into(&mut d, &bomb, 1 << 16, &mut out),
            Err(InflateError::TooLarge { limit: 1 << 16 })
        );
        assert!(out.capacity() <= (1 << 16) + 1, "held {}", out.capacity());
        // Exactly at the limit is fine; one byte over is not.
        let exact = {
            let mut c = Compress::new(Compression::fast(), false);
            let mut v = Vec::with_capacity(1 << 17);
            c.compress_vec(&vec![7u8; 1 << 16], &mut v, FlushCompress::Sync)
                .unwrap();
            v.truncate(v.len() - 4);
            v
        };
        assert_eq!(inflate(&exact, 1 << 16).unwrap().len(), 1 << 16);
        assert_eq!(
            inflate(&exact, (1 << 16) - 1),
            Err(InflateError::TooLarge { limit: (1 << 16) - 1 })
        );
    }
}
