//! MessagePack → JSON (what a `switchyard.v1.json` client receives), with
//! oracles: the JSON text is at most `json_len_bound` of the bytes read
//! (no blow-up, whatever the keys), it parses as JSON, and the transcoder
//! and `value_len` agree on where the value ends and on what is refused.
//! `fields` trimming runs on the same input and must stay a valid value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_common::transcode::{json_len_bound, msgpack_to_json, trim_map_fields, value_len};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let converted = msgpack_to_json(data, &mut out);
    assert_eq!(converted, value_len(data), "transcoder and value_len disagree");
    match converted {
        Ok(used) => {
            assert!(
                out.len() <= json_len_bound(used),
                "{} bytes of JSON for {used} bytes of MessagePack",
                out.len()
            );
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&out) {
                panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out));
            }
        }
        Err(_) => assert!(out.is_empty(), "output left behind on error"),
    }
    let mut trimmed = Vec::new();
    let keep = |k: &str| k.len() % 2 == 0;
    if let Ok(true) = trim_map_fields(data, &keep, &mut trimmed) {
        assert_eq!(value_len(&trimmed), Ok(trimmed.len()), "trimmed map is not one value");
    }
});
