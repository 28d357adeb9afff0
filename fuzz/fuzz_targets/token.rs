//! Token verification with an HS256 secret configured. First byte even:
//! the rest is the token string as a client sends it. Odd: the rest is
//! `header JSON 0xff claims JSON`, signed here with the secret, so the
//! fuzzer reaches claim parsing and validation behind the signature check.
//! Oracle: a verified token's `sub` follows the user id rule.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use switchyard_edge::auth::{AuthSettings, Verifier};

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let settings = AuthSettings {
            secret: Some(SECRET.into()),
            // No cache: every input goes through the whole check.
            cache_capacity: 0,
            ..AuthSettings::default()
        };
        Verifier::new(&settings).expect("an HS256 verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&b"{\"alg\":\"HS256\"}"[..], rest),
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signed = format!("{}.{}", b64.encode(header), b64.encode(claims));
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let Ok(sig) = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, jsonwebtoken::Algorithm::HS256) else {
            return;
        };
        format!("{signed}.{sig}")
    };
    if let Ok(claims) = verifier().verify(&token) {
        assert!(
            switchyard_common::ids::is_valid_user_id(&claims.sub),
            "{:?}",
            claims.sub
        );
    }
});
