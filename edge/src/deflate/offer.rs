//! Reading `Sec-WebSocket-Extensions` offers (RFC 6455 §9.1) and choosing a
//! permessage-deflate configuration (RFC 7692 §7.1) to answer with.
//!
//! Pure code, no I/O. A header that does not parse, or a permessage-deflate
//! offer this edge cannot honour, is declined, never refused: the upgrade
//! then goes on without compression (RFC 7692 §5: a server declines an
//! offer by not answering it). The first acceptable offer wins (the client
//! lists them in order of preference).

use std::fmt::Write as _;

use super::settings::DeflateSettings;

/// The extension's name in offers and answers.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The largest LZ77 window (log2 bytes).
const MAX_WINDOW_BITS: u8 = 15;

/// The smallest window zlib produces for raw deflate: it turns 8 into 9,
/// so an offer of `server_max_window_bits=8` cannot be honoured.
const MIN_SERVER_WINDOW_BITS: u8 = 9;

/// What the edge agreed to for one connection. Two bytes: the connection
/// keeps it for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The edge resets its compressor for every message (and so keeps no
    /// compressor of its own for the connection).
    pub server_no_context_takeover: bool,
    /// The LZ77 window the edge compresses with (log2 bytes, 9 to 15).
    pub server_window_bits: u8,
    /// `server_max_window_bits` goes into the answer (the client limited the
    /// window, or the operator chose a smaller one).
    announce_window: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value that accepts the offer. The
    /// client is always told `client_no_context_takeover` (RFC 7692
    /// §7.1.1.2 lets a server add it whether or not it was offered), so the
    /// edge inflates every message with an empty window and keeps no
    /// decompressor per connection.
    pub fn response(&self) -> String {
        let mut out = String::from(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        out.push_str("; client_no_context_takeover");
        if self.announce_window {
            let _ = write!(out, "; server_max_window_bits={}", self.server_window_bits);
        }
        out
    }
}

/// One parameter of an offer: its name and its value, if any (unquoted).
type Param<'a> = (&'a str, Option<std::borrow::Cow<'a, str>>);

/// Picks the first permessage-deflate offer in `values` (the request's
/// `Sec-WebSocket-Extensions` header fields, in order) that the edge can
/// honour under `settings`; `None` when there is none, deflate is off, or
/// a header does not parse.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>, settings: &DeflateSettings) -> Option<Agreed> {
    if !settings.enabled {
        return None;
    }
    let mut found = None;
    for value in values {
        // A header that is not text, or not the RFC 6455 grammar, declines
        // everything: guessing what a broken header meant is worse than
        // not compressing.
        let value = std::str::from_utf8(value).ok()?;
        for ext in split_outside_quotes(value, ',') {
            let ext = ext.trim();
            if ext.is_empty() {
                continue;
            }
            let mut parts = split_outside_quotes(ext, ';');
            let name = parts.next().unwrap_or("").trim();
            if !is_token(name) {
                return None;
            }
            let mut params = Vec::new();
            for p in parts {
                params.push(parse_param(p)?);
            }
            if found.is_none() && name == PERMESSAGE_DEFLATE {
                found = accept(&params, settings);
            }
        }
    }
    found
}

/// The configuration answering one offer, or `None` to decline it: an
/// unknown or repeated parameter, a value out of range or on a parameter
/// that takes none, or a window smaller than zlib can compress into.
fn accept(params: &[Param<'_>], settings: &DeflateSettings) -> Option<Agreed> {
    let mut server_no_takeover = false;
    let mut server_max: Option<u8> = None;
    let mut seen = [false; 4];
    for (name, value) in params {
        let slot = match *name {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
        match slot {
            0 | 1 if value.is_some() => return None,
            0 => server_no_takeover = true,
            // The edge asks for it anyway (see `Agreed::response`).
            1 => {}
            2 => server_max = Some(window_bits(value.as_deref()?)?),
            // The client may be limited (with a value, or none: "I support
            // the parameter"); the edge never limits it, since it inflates
            // with a full window and no context.
            _ => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
            }
        }
    }
    let takeover = settings.context_takeover && !server_no_takeover;
    let ours = if takeover {
        settings.window_bits
    } else {
        MAX_WINDOW_BITS
    };
    let bits = match server_max {
        Some(n) if n < MIN_SERVER_WINDOW_BITS => return None,
        Some(n) => n.min(ours),
        None => ours,
    };
    Some(Agreed {
        server_no_context_takeover: !takeover,
        server_window_bits: bits,
        announce_window: server_max.is_some() || bits < MAX_WINDOW_BITS,
    })
}

/// A window size value: decimal 8 to 15 without leading zeroes (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    match v {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => v.parse().ok(),
        _ => None,
    }
}

/// `name [ "=" (token | quoted-string) ]`, with surrounding whitespace.
fn parse_param(p: &str) -> Option<Param<'_>> {
    let (name, value) = match p.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (p.trim(), None),
    };
    if !is_token(name) {
        return None;
    }
    let value = match value {
        None => None,
        Some(v) if v.starts_with('"') => Some(unquote(v)?),
        Some(v) if is_token(v) => Some(std::borrow::Cow::Borrowed(v)),
        Some(_) => return None,
    };
    Some((name, value))
}

/// The content of a quoted-string (`\x` escapes undone); the result must
/// still be a token (RFC 6455 §9.1).
fn unquote(v: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    is_token(&out).then_some(std::borrow::Cow::Owned(out))
}

/// An HTTP token (RFC 7230 §3.2.6): one or more tchars.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Splits `s` at `sep`, except inside quoted-strings (where `\` escapes).
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> DeflateSettings {
        DeflateSettings::default()
    }

    fn answer(headers: &[&str], settings: &DeflateSettings) -> Option<String> {
        negotiate(headers.iter().map(|h| h.as_bytes()), settings).map(|a| a.response())
    }

    const DEFAULT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn a_plain_offer_gets_no_context_takeover_both_ways() {
        assert_eq!(answer(&["permessage-deflate"], &on()).as_deref(), Some(DEFAULT));
        // What browsers send.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"], &on()).as_deref(),
            Some(DEFAULT)
        );
        let a = negotiate([&b"permessage-deflate"[..]], &on()).unwrap();
        assert!(a.server_no_context_takeover);
        assert_eq!(a.server_window_bits, 15);
    }

    #[test]
    fn parameters_with_and_without_values_in_any_spacing() {
        for h in [
            "permessage-deflate;server_no_context_takeover;client_no_context_takeover",
            "permessage-deflate ; client_max_window_bits=10 ; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=\"12\"",
            "permessage-deflate; server_max_window_bits=15",
        ] {
            assert!(answer(&[h], &on()).is_some(), "{h}");
        }
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10"], &on()).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
            )
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=\"11\""], &on()).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11"
            )
        );
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=true",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; x_unknown",
        ] {
            assert_eq!(answer(&[bad], &on()), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; client_max_window_bits");
            assert_eq!(answer(&[&two], &on()).as_deref(), Some(DEFAULT), "{two}");
        }
    }

    #[test]
    fn several_offers_and_header_fields_and_other_extensions() {
        let h = "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=12, permessage-deflate";
        assert!(answer(&[h], &on()).unwrap().ends_with("server_max_window_bits=12"));
        assert_eq!(
            answer(&["foo; a=\"x\\y\"", "permessage-deflate"], &on()).as_deref(),
            Some(DEFAULT),
            "a quoted value with an escape"
        );
        assert_eq!(
            answer(&["foo; a=\"x,y\", permessage-deflate"], &on()),
            None,
            "a quoted value must still be a token (RFC 6455 §9.1): the header does not parse"
        );
        assert_eq!(answer(&["foo, bar; baz=1"], &on()), None, "nothing offered");
        assert_eq!(answer(&[", ,permessage-deflate,"], &on()).as_deref(), Some(DEFAULT));
        assert_eq!(answer(&[], &on()), None);
    }

    #[test]
    fn a_header_that_does_not_parse_declines_everything() {
        for bad in [
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; =10",
            "per message-deflate",
            "permessage-deflate; a b",
            "permessage-deflate; x=@",
            "permessage-deflate; client_max_window_bits=\"1 5\"",
        ] {
            assert_eq!(answer(&[bad], &on()), None, "{bad}");
        }
        assert_eq!(negotiate([&b"permessage-deflate\xff"[..]], &on()), None);
    }

    #[test]
    fn settings_decide_takeover_and_the_window() {
        let off = DeflateSettings { enabled: false, ..on() };
        assert_eq!(answer(&["permessage-deflate"], &off), None);
        let takeover = DeflateSettings {
            context_takeover: true,
            ..on()
        };
        assert_eq!(
            answer(&["permessage-deflate"], &takeover).as_deref(),
            Some("permessage-deflate; client_no_context_takeover")
        );
        let a = negotiate([&b"permessage-deflate"[..]], &takeover).unwrap();
        assert!(!a.server_no_context_takeover);
        // The client's wish wins over the operator's.
        assert_eq!(
            answer(&["permessage-deflate; server_no_context_takeover"], &takeover).as_deref(),
            Some(DEFAULT)
        );
        let small = DeflateSettings {
            context_takeover: true,
            window_bits: 10,
            ..on()
        };
        assert_eq!(
            answer(&["permessage-deflate"], &small).as_deref(),
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=10")
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=9"], &small).as_deref(),
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=9")
        );
    }
}
