//! Validation of every identifier that crosses a trust boundary.
//!
//! User ids end up as NATS subject tokens, so a hostile id (`a.b`, `*`, `>`,
//! spaces) must never get past these checks. Byte-level loops, no regex crate.

/// Longest user id (`sub` claim): `[A-Za-z0-9][A-Za-z0-9_-]{0,63}`.
pub const MAX_USER_ID_LEN: usize = 64;
/// Longest subscription name: `[A-Za-z0-9_-]{1,64}`.
pub const MAX_SUB_NAME_LEN: usize = 64;
/// Longest subscription/event type, dimension or field name: `[a-z][a-z0-9_]{0,31}`.
pub const MAX_TYPE_NAME_LEN: usize = 32;
/// Longest room name: `[A-Za-z0-9_:.-]{1,128}`.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest filter value, in bytes.
pub const MAX_VALUE_LEN: usize = 64;
/// Longest rpc method: `[a-z][a-z0-9_.]{0,63}`.
pub const MAX_METHOD_LEN: usize = 64;

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// A user id (the JWT `sub`), safe to use as a NATS subject token.
pub fn is_valid_user_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_USER_ID_LEN
        && alnum(b[0])
        && b[1..].iter().all(|&c| alnum(c) || c == b'_' || c == b'-')
}

/// A subscription name, unique per user.
pub fn is_valid_sub_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= MAX_SUB_NAME_LEN && b.iter().all(|&c| alnum(c) || c == b'_' || c == b'-')
}

/// A subscription type, event type, dimension or field name.
pub fn is_valid_type_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TYPE_NAME_LEN
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// A room name.
pub fn is_valid_room(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= MAX_ROOM_LEN && b.iter().all(|&c| alnum(c) || matches!(c, b'_' | b':' | b'.' | b'-'))
}

/// A filter or `match` value: any string of at most 64 bytes.
pub fn is_valid_value(s: &str) -> bool {
    s.len() <= MAX_VALUE_LEN
}

/// An rpc method name.
pub fn is_valid_method(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_METHOD_LEN
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.')
}

/// A single NATS subject token as producers may use for `<key>`: non-empty,
/// no `.`, no wildcards, no whitespace.
pub fn is_valid_subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| !matches!(c, b'.' | b'*' | b'>') && !c.is_ascii_whitespace() && !c.is_ascii_control())
}

/// Whether a token's `rooms` claim allows joining `room`: an exact name, or a
/// `prefix:*` pattern matching every room that starts with `prefix:` followed
/// by at least one character.
pub fn room_allowed(claim: &[String], room: &str) -> bool {
    claim.iter().any(|pattern| match pattern.strip_suffix('*') {
        Some(prefix) if prefix.ends_with(':') => room.len() > prefix.len() && room.starts_with(prefix),
        _ => pattern == room,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(is_valid_user_id("alice"));
        assert!(is_valid_user_id("A1_b-c"));
        assert!(is_valid_user_id(&"a".repeat(64)));
        for bad in ["", "a.b", "*", ">", "a b", " a", "_a", "-a", "a*", "é", "a\n"] {
            assert!(!is_valid_user_id(bad), "{bad:?} accepted");
        }
        assert!(!is_valid_user_id(&"a".repeat(65)));
    }

    #[test]
    fn names() {
        assert!(is_valid_sub_name("_x-1"));
        assert!(!is_valid_sub_name("a.b"));
        assert!(!is_valid_sub_name(""));
        assert!(is_valid_type_name("tier_patterns"));
        assert!(!is_valid_type_name("Tier"));
        assert!(!is_valid_type_name("1a"));
        assert!(!is_valid_type_name(&"a".repeat(33)));
        assert!(is_valid_room("chat:eu.main-1"));
        assert!(!is_valid_room("a b"));
        assert!(!is_valid_room(&"r".repeat(129)));
        assert!(is_valid_method("orders.place"));
        assert!(!is_valid_method("Orders"));
    }

    #[test]
    fn room_patterns() {
        let claim = vec!["lobby".to_string(), "desk:*".to_string()];
        assert!(room_allowed(&claim, "lobby"));
        assert!(room_allowed(&claim, "desk:fx"));
        assert!(!room_allowed(&claim, "desk:"));
        assert!(!room_allowed(&claim, "desk"));
        assert!(!room_allowed(&claim, "lobby2"));
        assert!(!room_allowed(&["*".to_string()], "anything"));
    }
}
