//! The WebSocket listener: HTTP handling up to the upgrade.
//!
//! Everything that can be refused with an HTTP status is refused here,
//! before a WebSocket exists: unknown path (404), not an upgrade (426),
//! only unknown subprotocols (400), a bad resume point (400), a bad header
//! token (401), a full node (503). Accepted upgrades become a
//! [`crate::session`] task. Paths under `/demo` go to `crate::demo` first
//! (when built with the `demo` feature and enabled).
//!
//! Connections not yet upgraded are bounded too, so that nobody can hold
//! file descriptors without ever finishing a request: the TLS handshake and
//! each request head must arrive within the handshake timeout, an idle
//! keep-alive connection is closed after it, every connection takes one of
//! the node's connection slots at accept (carried into the session at the
//! upgrade), and one source address may have only so many connections
//! waiting for their upgrade.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use std::sync::atomic::Ordering;

use hyper::header::{HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rmpv::Value;
use switchyard_common::client::{parse_resume, Resume, ResumeError};
use switchyard_common::Encoding;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;

use switchyard_runtime::http::respond;

use crate::node::Node;
use crate::session::{self, PreAuth};

/// Accepts connections until the node's cancel token fires; with an
/// acceptor, each connection speaks TLS first.
pub async fn serve(listener: TcpListener, node: Arc<Node>, tls: Option<TlsAcceptor>) {
    #[cfg(feature = "demo")]
    if let Some(dir) = &node.config.demo_dir {
        tracing::info!(
            dir = %dir.display(),
            dev_tokens = node.config.dev_tokens_enabled(),
            "demo page enabled at /demo/"
        );
    }
    let pending = PendingByAddr::new(node.config.max_pending_per_addr);
    loop {
        let (stream, peer) = tokio::select! {
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
        let Some(pending_slot) = pending.try_acquire(peer.ip()) else {
            metrics::counter!("switchyard_edge_refused_total", "reason" => "pending_per_addr").increment(1);
            tracing::debug!(%peer, "too many connections waiting for their upgrade from this address");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        // Without a slot the connection is still served, but only to be
        // refused: its upgrade gets 503 unless a slot has freed by then.
        let slot = node.conn_slots.clone().try_acquire_owned().ok();
        let node = node.clone();
        let tls = tls.clone();
        node.tasks.clone().spawn(async move {
            // Held until the connection leaves hyper: upgraded, or closed.
            let _pending_slot = pending_slot;
            let timeout = node.config.handshake_timeout;
            match tls {
                None => serve_http(stream, node, slot).await,
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, node, slot).await,
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

/// The node connection slot of a connection not yet upgraded: taken at
/// accept, moved into the session by the upgrade, given back when an
/// upgrade is refused (the connection may stay for keep-alive, but no
/// longer waits for an upgrade) or when the connection closes.
type SlotCell = Arc<Mutex<Option<OwnedSemaphorePermit>>>;

/// Counts connections not yet upgraded per source address (an IPv6 address
/// counts by its /64, what one subscriber usually gets) against a cap.
/// Upgraded connections leave the count: behind a proxy or a large NAT many
/// users share an address, and those are bounded per user instead.
struct PendingByAddr {
    /// 0: no cap, nothing counted.
    cap: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PendingByAddr`] (none without a cap); given
/// back on drop.
struct PendingSlot(Option<(Arc<PendingByAddr>, IpAddr)>);

impl PendingByAddr {
    fn new(cap: usize) -> Arc<PendingByAddr> {
        Arc::new(PendingByAddr {
            cap,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The address a connection counts under.
    fn key(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
        }
    }

    /// A place for a connection from `addr`, or `None` at the cap.
    fn try_acquire(self: &Arc<Self>, addr: IpAddr) -> Option<PendingSlot> {
        if self.cap == 0 {
            return Some(PendingSlot(None));
        }
        let key = PendingByAddr::key(addr);
        let mut counts = self.counts.lock().expect("pending table lock");
        let n = counts.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PendingSlot(Some((self.clone(), key))))
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let Some((table, key)) = &self.0 else { return };
        let mut counts = table.counts.lock().expect("pending table lock");
        if let Some(n) = counts.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(key);
            }
        }
    }
}

async fn serve_http<S>(io: S, node: Arc<Node>, slot: Option<OwnedSemaphorePermit>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_node = node.clone();
    let slot: SlotCell = Arc::new(Mutex::new(slot));
    let service = hyper::service::service_fn(move |req| {
        let node = svc_node.clone();
        let slot = slot.clone();
        async move {
            #[cfg(feature = "demo")]
            if let Some(r) = crate::demo::route(&node.config, req.method(), req.uri()).await {
                return Ok::<_, Infallible>(r);
            }
            Ok::<_, Infallible>(handle(node, req, &slot))
        }
    });
    // The timer arms hyper's header-read timeout, which runs whenever hyper
    // waits for a request head: the first one, and each one after a
    // keep-alive response (so it also closes idle keep-alive connections).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config.handshake_timeout)
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
        if e.is_timeout() {
            metrics::counter!("switchyard_edge_refused_total", "reason" => "handshake_timeout").increment(1);
        }
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

fn refuse(reason: &'static str, status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
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

struct Query {
    resume: Option<Resume>,
    token: Option<String>,
}

/// Reads the upgrade URL's query (`application/x-www-form-urlencoded`: `+`
/// is a space, `%XX` an escape, a malformed escape stays as it is).
fn parse_query(query: Option<&str>) -> Result<Query, ResumeError> {
    let (mut epoch, mut since, mut token) = (None, None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let v = v.into_owned();
        match &*k {
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

fn handle(node: Arc<Node>, mut req: Request<hyper::body::Incoming>, slot: &SlotCell) -> Response<Full<Bytes>> {
    if req.uri().path() != "/ws" {
        return respond(StatusCode::NOT_FOUND, "not found; the WebSocket endpoint is /ws\n");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return respond(StatusCode::UPGRADE_REQUIRED, "this endpoint only speaks WebSocket\n");
    }
    // From here on the request is an upgrade: the connection's slot goes
    // into the session, or back to the node with any refusal below.
    let held = slot.lock().expect("slot lock").take();
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
        Err(e) => return respond(StatusCode::BAD_REQUEST, format!("{e}\n")),
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
        Some(token) => match node.verify(token) {
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
    let Some(permit) = held.or_else(|| node.conn_slots.clone().try_acquire_owned().ok()) else {
        return refuse(
            "node_connections",
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is full; connect to another\n",
        );
    };
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => return respond(StatusCode::BAD_REQUEST, format!("bad upgrade request: {e}\n")),
    };
    if echo_protocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(encoding.subprotocol()));
    }
    // An offer we cannot take is declined, never refused: no compression.
    let deflate = crate::deflate::negotiate(
        req.headers()
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
        &node.config.deflate,
    )
    .and_then(|agreed| {
        let value = HeaderValue::from_str(&agreed.response()).ok()?;
        response.headers_mut().insert(SEC_WEBSOCKET_EXTENSIONS, value);
        Some(agreed)
    });
    node.tasks
        .spawn(session::run(node.clone(), upgrade, encoding, deflate, pre_auth, permit));
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

    #[test]
    fn pending_connections_are_capped_per_address_and_given_back() {
        let table = PendingByAddr::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = table.try_acquire(a).expect("first");
        let s2 = table.try_acquire(a).expect("second");
        assert!(table.try_acquire(a).is_none(), "third from the same address");
        let _other = table.try_acquire(b).expect("another address has its own count");
        drop(s1);
        let s3 = table.try_acquire(a).expect("a place came back");
        drop((s2, s3));
        assert!(
            !table.counts.lock().unwrap().contains_key(&a),
            "empty entries are removed"
        );
        // IPv6 counts by /64; an IPv4-mapped address counts as the IPv4 one.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _x = table.try_acquire(v6("2001:db8:1:2::1")).unwrap();
        let _y = table.try_acquire(v6("2001:db8:1:2:ffff::9")).unwrap();
        assert!(table.try_acquire(v6("2001:db8:1:2::77")).is_none(), "same /64");
        assert!(table.try_acquire(v6("2001:db8:1:3::1")).is_some(), "another /64");
        let _m = table.try_acquire(v6("::ffff:192.0.2.2")).unwrap();
        assert!(table.try_acquire(b).is_none(), "mapped and plain IPv4 share a count");
        // 0 turns the cap off.
        let off = PendingByAddr::new(0);
        let held: Vec<_> = (0..1000).map(|_| off.try_acquire(a).expect("no cap")).collect();
        assert_eq!(held.len(), 1000);
        assert!(off.counts.lock().unwrap().is_empty());
    }
}
