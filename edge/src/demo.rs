//! The demo page: static files under `/demo/` on the WebSocket port, and a
//! dev-token endpoint for it.
//!
//! Off unless a directory is configured (`SWITCHYARD_DEMO_DIR`); then every
//! `/demo/...` path is a file inside that directory and nothing else: each
//! path segment must be a plain name (`[A-Za-z0-9_.-]`, not starting with a
//! dot, no escapes), and the resolved file must still lie inside the
//! directory after symlinks are followed. Anything else is 404, so a request
//! cannot learn what exists outside.
//!
//! `/demo/token?sub=<user>` mints a short-lived HS256 token signed with the
//! built-in dev secret, so the page works out of the box. It exists only on
//! an edge in dev mode (`--dev-insecure`) with no key configured, where that
//! secret is the one tokens are checked against anyway; a production edge
//! (any key configured) never serves it. This module does not touch
//! WebSocket connections, and imports nothing from [`crate::server`] (which
//! calls it). Built only with the cargo feature `demo` (on by default).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Method, Response, StatusCode, Uri};
use serde_json::json;
use switchyard_common::ids::is_valid_user_id;

use switchyard_runtime::http::respond;

use crate::config::{EdgeConfig, DEV_JWT_SECRET};

/// Where the demo lives on the WebSocket port.
pub const PREFIX: &str = "/demo";

/// Largest file served (the page and its bundle are far smaller).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Dev tokens live this long unless the request asks otherwise (seconds).
const DEFAULT_TOKEN_TTL_S: u64 = 300;
/// Bounds of a requested dev-token lifetime (seconds).
const TOKEN_TTL_RANGE: std::ops::RangeInclusive<u64> = 5..=3600;

/// Answers a request under `/demo` when the demo is enabled; `None` for any
/// other path or when the demo is off (the caller then answers 404).
pub async fn route(config: &EdgeConfig, method: &Method, uri: &Uri) -> Option<Response<Full<Bytes>>> {
    let dir = config.demo_dir.as_ref()?;
    let path = uri.path();
    let rest = if path == PREFIX {
        return Some(redirect(&format!("{PREFIX}/")));
    } else {
        path.strip_prefix(PREFIX)?.strip_prefix('/')?
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    if rest == "token" {
        return Some(if config.dev_tokens_enabled() {
            mint(uri.query())
        } else {
            not_found()
        });
    }
    let Some(relative) = safe_relative(rest) else {
        metrics::counter!("switchyard_edge_refused_total", "reason" => "demo_path").increment(1);
        return Some(not_found());
    };
    let dir = dir.clone();
    let read = tokio::task::spawn_blocking(move || read_inside(&dir, &relative)).await;
    Some(match read {
        Ok(Ok((bytes, name))) => file_response(bytes, &name),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, path, "demo file not served");
            not_found()
        }
        Err(e) => {
            tracing::warn!(error = %e, "demo file read task failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    })
}

/// The path below `/demo/` as a relative path of plain names, or `None`
/// when any segment could step outside (`..`, `.`, hidden names, escapes,
/// backslashes, empty segments). A trailing `/` means that folder's `index.html`.
fn safe_relative(rest: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let (body, index) = match rest.strip_suffix('/') {
        Some(b) => (b, true),
        None => (rest, rest.is_empty()),
    };
    if !body.is_empty() {
        for seg in body.split('/') {
            let plain = !seg.is_empty()
                && !seg.starts_with('.')
                && seg.len() <= 255
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !plain {
                return None;
            }
            out.push(seg);
        }
    }
    if index {
        out.push("index.html");
    }
    Some(out)
}

/// Reads `relative` below `dir`, refusing anything that resolves (through
/// symlinks) outside it, and anything that is not a regular file.
fn read_inside(dir: &Path, relative: &Path) -> std::io::Result<(Vec<u8>, String)> {
    let root = dir.canonicalize()?;
    let file = root.join(relative).canonicalize()?;
    if !file.starts_with(&root) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "resolves outside the demo directory",
        ));
    }
    let meta = std::fs::metadata(&file)?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file of a servable size",
        ));
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((std::fs::read(&file)?, name))
}

/// The content type for a file name, by extension.
fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

fn file_response(bytes: Vec<u8>, name: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
    // A demo is edited and rebuilt while an edge runs: always revalidate.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// Mints a dev token: `?sub=` (default `demo`), `?ttl_s=` (default 300, 5..=3600).
fn mint(query: Option<&str>) -> Response<Full<Bytes>> {
    let (mut sub, mut ttl_s) = ("demo".to_string(), DEFAULT_TOKEN_TTL_S);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "sub" => sub = v.into_owned(),
            "ttl_s" => match v.parse::<u64>() {
                Ok(n) if TOKEN_TTL_RANGE.contains(&n) => ttl_s = n,
                _ => return plain(StatusCode::BAD_REQUEST, "ttl_s must be an integer from 5 to 3600\n"),
            },
            _ => {}
        }
    }
    if !is_valid_user_id(&sub) {
        return plain(
            StatusCode::BAD_REQUEST,
            "sub must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}\n",
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let exp = now + ttl_s;
    let claims = json!({"sub": sub, "iat": now, "exp": exp, "rooms": ["demo:*"]});
    let token = match jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(DEV_JWT_SECRET.as_bytes()),
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot sign a dev token");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign a dev token\n");
        }
    };
    let body = json!({"token": token, "sub": sub, "exp": exp}).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = respond(status, body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn not_found() -> Response<Full<Bytes>> {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut r = plain(StatusCode::PERMANENT_REDIRECT, "moved\n");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_inside_the_directory() {
        assert_eq!(safe_relative(""), Some(PathBuf::from("index.html")));
        assert_eq!(safe_relative("app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(safe_relative("a/b.css"), Some(PathBuf::from("a/b.css")));
        assert_eq!(safe_relative("a/"), Some(PathBuf::from("a/index.html")));
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "./x",
            ".hidden",
            "a//b",
            "%2e%2e/x",
            "a\\..\\x",
            "/etc/passwd",
            "a/./b",
            "x\0",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("switchyard.min.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("demo.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type("shot.png"), "image/png");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
