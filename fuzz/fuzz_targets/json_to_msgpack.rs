//! JSON producer `data` → MessagePack, with oracles: what is accepted is
//! one MessagePack value within the depth limit, and converting it back to
//! JSON gives the same value as parsing the text (numbers compared by
//! value, since `-0` becomes the integer 0 on purpose, and within a few
//! ulps: serde_json's default float parsing is not correctly rounded for
//! long mantissas, so its two parses of one number may differ by an ulp;
//! docs/TESTING.md, "Findings").
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard_common::transcode::{json_text_to_msgpack, msgpack_to_json, value_len};

/// Equal as JSON values, numbers compared as numbers (1 == 1.0, 0 == -0.0),
/// floats within 4 ulps.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut mp = Vec::new();
    match json_text_to_msgpack(text, &mut mp) {
        Ok(()) => {
            assert_eq!(value_len(&mp), Ok(mp.len()), "not one MessagePack value");
            let mut json = Vec::new();
            msgpack_to_json(&mp, &mut json).expect("accepted data transcodes back");
            let back: Value = serde_json::from_slice(&json).expect("transcoded JSON parses");
            let direct: Value = serde_json::from_str(text).expect("accepted text parses");
            assert!(same(&back, &direct), "{text} came back as {back}");
        }
        Err(_) => assert!(mp.is_empty(), "output left behind on error"),
    }
});
