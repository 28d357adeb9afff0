//! Decoding untrusted MessagePack or JSON into one generic value type.
//!
//! Client frames and producer events arrive in either encoding; decoding
//! both into [`rmpv::Value`] lets one piece of code interpret them. Depth is
//! bounded so hostile nesting cannot exhaust the stack.

use rmpv::Value;

use crate::Encoding;

/// Deepest nesting accepted in a client frame or producer event.
pub const MAX_DEPTH: usize = 32;

/// Why a buffer did not decode into a value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not valid MessagePack (or truncated, or nested too deeply).
    #[error("invalid MessagePack: {0}")]
    MsgPack(#[source] rmpv::decode::Error),
    /// Not valid JSON (or nested too deeply).
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Bytes left over after the value.
    #[error("trailing bytes after the value")]
    Trailing,
}

/// Decodes exactly one value from `buf` in `enc`.
pub fn decode(enc: Encoding, buf: &[u8]) -> Result<Value, DecodeError> {
    match enc {
        Encoding::MsgPack => {
            let mut rd = buf;
            let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH).map_err(DecodeError::MsgPack)?;
            if !rd.is_empty() {
                return Err(DecodeError::Trailing);
            }
            Ok(v)
        }
        Encoding::Json => {
            let json: serde_json::Value = serde_json::from_slice(buf).map_err(DecodeError::Json)?;
            Ok(json_to_value(&json))
        }
    }
}

/// Converts a JSON value into the generic value type (integers stay integers).
pub fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(json_to_value).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        ),
    }
}

/// Looks up a string key in a map value's entries.
pub fn get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

/// A numeric value as `f64` (integers and floats; nothing else).
pub fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => i.as_f64(),
        Value::F32(f) => Some(f64::from(*f)),
        Value::F64(f) => Some(*f),
        _ => None,
    }
}
