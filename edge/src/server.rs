//! The WebSocket listener: HTTP handling up to the upgrade.
//!
//! Everything that can be refused with an HTTP status is refused here,
//! before a WebSocket exists: unknown path (404), not an upgrade (426),
//! only unknown subprotocols (400), a bad resume point (400), a bad header
//! token (401). Accepted upgrades become a [`crate::session`] task.
//! Paths under `/demo` go to [`crate::demo`] first (when enabled).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use std::sync::atomic::Ordering;

use hyper::header::{HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rmpv::Value;
use switchyard_common::client::{parse_resume, Resume};
use switchyard_common::Encoding;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::node::Node;
use crate::session::{self, PreAuth};

fn respond(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// Accepts connections until the node's cancel token fires; with an
/// acceptor, each connection speaks TLS first.
pub async fn serve(listener: TcpListener, node: Arc<Node>, tls: Option<TlsAcceptor>) {
    if let Some(dir) = &node.config.demo_dir {
        tracing::info!(
            dir = %dir.display(),
            dev_tokens = node.config.dev_tokens_enabled(),
            "demo page enabled at /demo/"
        );
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = node.cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let node = node.clone();
        let tls = tls.clone();
        node.tasks.clone().spawn(async move {
            match tls {
                None => serve_http(stream, node).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, node).await,
                    Ok(Err(e)) => {
                        metrics::counter!("switchyard_edge_refused_total", "reason" => "tls").increment(1);
                        tracing::debug!(error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("switchyard_edge_refused_total", "reason" => "tls_timeout").increment(1);
                    }
                },
            }
        });
    }
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_http<S>(io: S, node: Arc<Node>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_node = node.clone();
    let service = hyper::service::service_fn(move |req| {
        let node = svc_node.clone();
        async move {
            if let Some(r) = crate::demo::route(&node.config, req.method(), req.uri()).await {
                return Ok::<_, Infallible>(r);
            }
            Ok::<_, Infallible>(handle(node, req))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    // An upgraded connection has left hyper by then; what is still here is
    // plain HTTP (the demo page's keep-alive connections), which must not
    // hold the node's shutdown up.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = node.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

fn refuse(reason: &'static str, status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    metrics::counter!("switchyard_edge_refused_total", "reason" => reason).increment(1);
    respond(status, body)
}

/// Picks the encoding from `Sec-WebSocket-Protocol`: the client's first
/// known choice; none offered means MessagePack; only unknown ones is an error.
fn negotiate(req: &Request<hyper::body::Incoming>) -> Result<(Encoding, bool), ()> {
    let mut offered = false;
    for value in req.headers().get_all(SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            offered = true;
            if let Some(enc) = Encoding::from_subprotocol(name) {
                return Ok((enc, true));
            }
        }
    }
    if offered {
        Err(())
    } else {
        Ok((Encoding::MsgPack, false))
    }
}

/// Decodes `%XX` escapes and `+` in a query component.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

struct Query {
    resume: Option<Resume>,
    token: Option<String>,
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let (mut epoch, mut since, mut token) = (None, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or("bad percent-encoding in the query")?;
        match k {
            "epoch" => epoch = Some(Value::from(v)),
            "since" => {
                since = Some(match v.parse::<u64>() {
                    Ok(n) if !v.starts_with('+') => Value::from(n),
                    _ => Value::from(v),
                })
            }
            "token" => token = Some(v),
            _ => {}
        }
    }
    let resume = parse_resume(epoch, since)?;
    Ok(Query { resume, token })
}

fn handle(node: Arc<Node>, mut req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/ws" {
        return respond(StatusCode::NOT_FOUND, "not found; the WebSocket endpoint is /ws\n");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return respond(StatusCode::UPGRADE_REQUIRED, "this endpoint only speaks WebSocket\n");
    }
    if node.draining.load(Ordering::Relaxed) {
        return refuse(
            "draining",
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining; connect to another\n",
        );
    }
    if !node.config.allowed_origins.is_empty() {
        if let Some(origin) = req.headers().get(ORIGIN) {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| node.config.allowed_origins.iter().any(|a| a == o));
            if !allowed {
                return refuse("origin", StatusCode::FORBIDDEN, "origin not allowed\n");
            }
        }
    }
    let Ok((encoding, echo_protocol)) = negotiate(&req) else {
        return respond(
            StatusCode::BAD_REQUEST,
            "unsupported subprotocol; supported: switchyard.v1.msgpack, switchyard.v1.json\n",
        );
    };
    let query = match parse_query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return respond(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    let header_token = req.headers().get(AUTHORIZATION).map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("")
    });
    let query_token = if node.config.allow_query_token {
        query.token.as_deref()
    } else {
        None
    };
    let pre_auth = match header_token.or(query_token) {
        None => None,
        Some(token) => match node.verifier.verify(token) {
            Ok(claims) => {
                let Some(slot) = node.user_slots.try_acquire(&claims.sub) else {
                    return refuse(
                        "user_connections",
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many connections for this user on this node\n",
                    );
                };
                Some(PreAuth {
                    claims,
                    resume: query.resume,
                    slot,
                })
            }
            Err(e) => {
                metrics::counter!("switchyard_edge_auth_failures_total", "reason" => e.reason()).increment(1);
                return respond(StatusCode::UNAUTHORIZED, "invalid token\n");
            }
        },
    };
    let Ok(permit) = node.conn_slots.clone().try_acquire_owned() else {
        return refuse(
            "node_connections",
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is full; connect to another\n",
        );
    };
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => return respond(StatusCode::BAD_REQUEST, &format!("bad upgrade request: {e}\n")),
    };
    if echo_protocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(encoding.subprotocol()));
    }
    node.tasks
        .spawn(session::run(node.clone(), upgrade, encoding, pre_auth, permit));
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(Some("epoch=e%3A1&since=42")).unwrap();
        assert_eq!(
            q.resume,
            Some(Resume {
                epoch: "e:1".into(),
                since: 42
            })
        );
        assert!(parse_query(Some("since=4")).is_err());
        assert!(parse_query(Some("epoch=e&since=-4")).is_err());
        assert!(parse_query(Some("epoch=e&since=abc")).is_err());
        assert_eq!(
            parse_query(Some("epoch=e")).unwrap().resume,
            Some(Resume {
                epoch: "e".into(),
                since: 0
            })
        );
        assert_eq!(parse_query(Some("token=a%2Eb")).unwrap().token.as_deref(), Some("a.b"));
        assert!(parse_query(None).unwrap().resume.is_none());
    }
}
