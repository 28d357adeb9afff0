//! Producer events, both encodings (first byte: even MessagePack, odd
//! JSON), with oracles: an accepted event's `data` is one MessagePack value
//! within the depth limit, and its delivery converts for JSON clients (an
//! accepted event never fails on the way to a client) into valid JSON.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_common::delivery::{encode_delivery, write_event_frame};
use switchyard_common::event::parse_event;
use switchyard_common::transcode::value_len;
use switchyard_common::Encoding;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let json = mode & 1 == 1;
    let key = (mode & 2 == 2).then_some("k1");
    let Ok(ev) = parse_event("tick", key, &Bytes::copy_from_slice(payload), json) else {
        return;
    };
    assert_eq!(value_len(&ev.data), Ok(ev.data.len()), "data is not one value");
    let mut body = Vec::new();
    encode_delivery(&ev, 1, &["s"], &ev.data, &mut body);
    for enc in [Encoding::MsgPack, Encoding::Json] {
        let mut frame = Vec::new();
        write_event_frame(enc, &body, Some(7), &mut frame).expect("an accepted event converts");
        if enc == Encoding::Json {
            serde_json::from_slice::<serde::de::IgnoredAny>(&frame).expect("the frame is JSON");
        } else {
            assert_eq!(value_len(&frame), Ok(frame.len()));
        }
    }
});
