//! Fixtures the edge's unit tests share.

use bytes::Bytes;

/// A minimal delivery body: `{"type": "t", "data": n, "ts": 0}`.
pub fn body(n: u8) -> Bytes {
    let v = rmpv::Value::Map(vec![
        ("type".into(), "t".into()),
        ("data".into(), rmpv::Value::from(n)),
        ("ts".into(), rmpv::Value::from(0)),
    ]);
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, &v).expect("encoding to a Vec");
    Bytes::from(b)
}
