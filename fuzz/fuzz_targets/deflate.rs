//! permessage-deflate's two parsers of untrusted input (edge/src/deflate/):
//! the first byte picks one.
//! - even: the rest is a `Sec-WebSocket-Extensions` header value for
//!   `deflate::negotiate`. Oracles: an accepted offer's window is 9 to 15
//!   bits, and the edge's own answer, read back as an offer, is accepted
//!   with the same agreement (it is valid RFC 7692 syntax).
//! - odd: the rest is a compressed message for `deflate::codec::inflate`
//!   with a 1 KiB limit. Oracles: an inflated message is at most the
//!   limit, and one that inflates compresses back (through the writer's
//!   framing) to something that inflates to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_edge::deflate::codec::{inflate, InflateError};
use switchyard_edge::deflate::{negotiate, put_data_frame, DeflateSettings, FrameDeflater};

const LIMIT: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let settings = DeflateSettings {
        min_bytes: 1,
        ..DeflateSettings::default()
    };
    if mode & 1 == 0 {
        let Some(agreed) = negotiate([rest], &settings) else {
            return;
        };
        assert!((9..=15).contains(&agreed.server_window_bits));
        let answer = agreed.response();
        let again = negotiate([answer.as_bytes()], &settings).expect("our own answer is a valid offer");
        assert_eq!(again, agreed, "{answer}");
        return;
    }
    match inflate(rest, LIMIT) {
        Ok(out) => {
            assert!(out.len() <= LIMIT);
            let agreed = negotiate([&b"permessage-deflate"[..]], &settings).expect("accepted");
            let mut d = FrameDeflater::new(&agreed, &settings);
            let mut frame = Vec::new();
            put_data_frame(&mut frame, 0x2, &out, Some(&mut d));
            let head = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            if frame[0] & 0x40 != 0 {
                assert_eq!(inflate(&frame[head..], LIMIT).expect("our own output inflates"), out);
            } else {
                assert_eq!(&frame[head..], &out[..]);
            }
        }
        Err(InflateError::Invalid | InflateError::TooLarge { .. }) => {}
    }
});
