//! Token revocations: how they are kept in the revocation bucket, and the
//! in-memory set every edge checks tokens against.
//!
//! Routers write a revocation (application API `revoke`) to a JetStream
//! key-value bucket; every edge watches the bucket and keeps a
//! [`RevocationSet`], so a token is checked at connect and at refresh with
//! no NATS round trip. Each entry carries the time after which no token it
//! covers can still be valid (its `expires`), so edges forget it then and
//! the set stays as small as the operator's longest token lifetime allows.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The bucket key of a user revocation.
pub fn user_key(user: &str) -> String {
    format!("user.{user}")
}

/// The bucket key of a token revocation (`jti` in URL-safe base64, since a
/// `jti` may hold any character and bucket keys may not).
pub fn token_key(jti: &str) -> String {
    format!("jti.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti))
}

/// A revocation as stored in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// User revocations: tokens issued before this (unix s) are refused.
    /// Token revocations: the token is refused until this (unix s).
    pub at: u64,
    /// Unix seconds after which no token this covers is valid any more.
    pub expires: u64,
}

impl Entry {
    /// Encodes the bucket value.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("revocations encode")
    }

    /// Decodes a bucket value.
    pub fn decode(buf: &[u8]) -> Option<Entry> {
        rmp_serde::from_slice(buf).ok()
    }
}

/// What a token says about itself, for the check.
#[derive(Debug, Clone, Copy)]
pub struct TokenFacts<'a> {
    /// `sub`.
    pub user: &'a str,
    /// `iat`, when present.
    pub iat: Option<u64>,
    /// `jti`, when present.
    pub jti: Option<&'a str>,
}

/// The revocations in force, keyed as in the bucket.
#[derive(Debug, Default)]
pub struct RevocationSet {
    users: HashMap<String, Entry>,
    tokens: HashMap<String, Entry>,
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> RevocationSet {
        RevocationSet::default()
    }

    /// Applies a bucket entry (`value` `None`: the key was deleted or purged).
    /// Unknown keys and undecodable values are ignored.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) {
        let (map, id) = if let Some(user) = key.strip_prefix("user.") {
            (&mut self.users, user.to_string())
        } else if let Some(jti) = key.strip_prefix("jti.") {
            match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jti) {
                Ok(raw) => match String::from_utf8(raw) {
                    Ok(jti) => (&mut self.tokens, jti),
                    Err(_) => return,
                },
                Err(_) => return,
            }
        } else {
            return;
        };
        match value.and_then(Entry::decode) {
            Some(entry) => {
                map.insert(id, entry);
            }
            None => {
                map.remove(&id);
            }
        }
    }

    /// Whether a token with these facts is revoked at `now_s`. A user
    /// revocation covers tokens issued before it, and tokens without `iat`
    /// (nothing shows they were issued after it).
    pub fn is_revoked(&self, token: TokenFacts<'_>, now_s: u64) -> bool {
        if let Some(e) = self.users.get(token.user) {
            if e.expires > now_s && token.iat.is_none_or(|iat| iat < e.at) {
                return true;
            }
        }
        match token.jti {
            Some(jti) => self.tokens.get(jti).is_some_and(|e| e.at > now_s),
            None => false,
        }
    }

    /// Forgets entries that cover no valid token any more.
    pub fn prune(&mut self, now_s: u64) {
        self.users.retain(|_, e| e.expires > now_s);
        self.tokens.retain(|_, e| e.at > now_s);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.users.len() + self.tokens.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(user: &'a str, iat: Option<u64>, jti: Option<&'a str>) -> TokenFacts<'a> {
        TokenFacts { user, iat, jti }
    }

    #[test]
    fn a_user_revocation_covers_older_tokens_only() {
        let mut set = RevocationSet::new();
        set.apply(&user_key("u1"), Some(&Entry { at: 100, expires: 1000 }.encode()));
        assert!(set.is_revoked(facts("u1", Some(99), None), 200));
        assert!(
            set.is_revoked(facts("u1", None, None), 200),
            "no iat: not shown to be newer"
        );
        assert!(!set.is_revoked(facts("u1", Some(100), None), 200));
        assert!(!set.is_revoked(facts("u2", Some(1), None), 200));
        assert!(!set.is_revoked(facts("u1", Some(99), None), 1000), "past expires");
    }

    #[test]
    fn a_token_revocation_holds_until_its_end() {
        let mut set = RevocationSet::new();
        let jti = "weird id/with.dots ✓";
        set.apply(&token_key(jti), Some(&Entry { at: 500, expires: 500 }.encode()));
        assert!(set.is_revoked(facts("anyone", Some(1), Some(jti)), 499));
        assert!(!set.is_revoked(facts("anyone", Some(1), Some(jti)), 500));
        assert!(!set.is_revoked(facts("anyone", Some(1), Some("other")), 10));
        assert!(!set.is_revoked(facts("anyone", Some(1), None), 10));
    }

    #[test]
    fn deletes_prunes_and_junk() {
        let mut set = RevocationSet::new();
        set.apply(&user_key("u1"), Some(&Entry { at: 100, expires: 1000 }.encode()));
        set.apply(&token_key("j"), Some(&Entry { at: 50, expires: 50 }.encode()));
        set.apply("user.u2", Some(b"\xc1"));
        set.apply("other.key", Some(&Entry { at: 1, expires: 2 }.encode()));
        set.apply("jti.!!!", Some(&Entry { at: 1, expires: 2 }.encode()));
        assert_eq!(set.len(), 2);
        set.prune(60);
        assert_eq!(set.len(), 1);
        set.apply(&user_key("u1"), None);
        assert!(set.is_empty());
    }

    #[test]
    fn keys_are_valid_bucket_keys() {
        let ok = |k: &str| {
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '/'))
        };
        assert!(ok(&user_key("User_1-a")));
        assert!(ok(&token_key("a b.c*>")));
    }
}
