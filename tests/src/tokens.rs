//! Signing HS256 tokens for tests and for the dev tools.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// Unix seconds now.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token for `sub` valid for `ttl_s` seconds, with extra claims merged in.
pub fn token(secret: &str, sub: &str, ttl_s: i64, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": (now_s() as i64 + ttl_s).max(0), "iat": now_s()});
    if let (Some(c), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        c.extend(extra);
    }
    sign(secret, &claims, Algorithm::HS256)
}

/// Signs arbitrary claims (tests use it for malformed tokens).
pub fn sign(secret: &str, claims: &Value, alg: Algorithm) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret.as_bytes())).expect("HMAC signing cannot fail")
}

/// An unsigned `alg: none` token, which every edge must refuse.
pub fn alg_none(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}
