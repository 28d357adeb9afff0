//! Edge operations end to end: WSS, connection limits, origin allow-list,
//! and the drain on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::{Connect, ConnectError, Incoming, WsClient};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

type R = anyhow::Result<()>;

async fn http_status(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(switchyard_tests::fleet::http_get(addr, path).await?.0)
}

#[tokio::test]
async fn wss_with_a_certificate_generated_at_test_time() -> R {
    let dir = tempfile::tempdir()?;
    let cert = switchyard_tests::fleet::write_test_certificate(dir.path())?;
    let fleet = Fleet::start_with(|c| {
        cert.serve(c);
    })
    .await?;
    let port = fleet.edge.as_ref().unwrap().ws_addr.port();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut req = format!("wss://localhost:{port}/ws").into_client_request()?;
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {}", fleet.token("alice", json!({}))))?,
    );
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("switchyard.v1.json"));
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(client_config));
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector)).await?;
    use futures::{SinkExt, StreamExt};
    let ready = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .context("closed")??;
    let ready: serde_json::Value = serde_json::from_str(ready.to_text()?)?;
    assert_eq!(ready["op"], "ready");
    ws.send(tokio_tungstenite::tungstenite::Message::text(r#"{"op":"ping","id":1}"#))
        .await?;
    let pong = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .context("closed")??;
    assert!(pong.to_text()?.contains("\"pong\""));
    // Plain ws:// to a TLS port does not get a WebSocket.
    assert!(
        WsClient::connect(&format!("ws://127.0.0.1:{port}/ws"), &Connect::default())
            .await
            .is_err()
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn per_user_and_per_node_connection_limits() -> R {
    let fleet = Fleet::start_with(|c| {
        c.max_connections_per_user = 2;
        c.max_connections = 4;
    })
    .await?;
    let url = fleet.ws_url();
    let t = fleet.token("alice", json!({}));
    let (_a1, _) = WsClient::connect_ready(&url, &t, &[]).await?;
    let (_a2, _) = WsClient::connect_ready(&url, &t, &[]).await?;
    // Header auth: HTTP 429 before the upgrade.
    let opts = Connect {
        bearer: Some(t.clone()),
        ..Default::default()
    };
    assert_eq!(
        WsClient::connect(&url, &opts).await.err(),
        Some(ConnectError::Status(429))
    );
    // Frame auth: close 4008 before ready.
    let mut c = WsClient::connect(&url, &Connect::default()).await.expect("upgrade");
    c.send(&json!({"op":"auth","token":t})).await?;
    assert_eq!(c.expect_close().await?, 4008);
    // Another user is fine until the node is full.
    let (_b1, _) = WsClient::connect_ready(&url, &fleet.token("bob", json!({})), &[]).await?;
    let (_b2, _) = WsClient::connect_ready(&url, &fleet.token("bob", json!({})), &[]).await?;
    let opts = Connect {
        bearer: Some(fleet.token("carol", json!({}))),
        ..Default::default()
    };
    assert_eq!(
        WsClient::connect(&url, &opts).await.err(),
        Some(ConnectError::Status(503))
    );
    // A slot frees when a connection closes.
    drop(_a1);
    let mut ok = false;
    for _ in 0..100 {
        if WsClient::connect(&url, &opts).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "slot not released after a close");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn origin_allow_list() -> R {
    let fleet = Fleet::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await?;
    let url = fleet.ws_url();
    let t = fleet.token("alice", json!({}));
    let connect = |origin: Option<&'static str>| {
        let url = url.clone();
        let t = t.clone();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
            if let Some(o) = origin {
                req.headers_mut().insert("Origin", HeaderValue::from_static(o));
            }
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(connect(Some("https://app.example")).await, 101);
    assert_eq!(connect(Some("https://evil.example")).await, 403);
    assert_eq!(connect(None).await, 101);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn drain_sends_reconnect_spread_then_1001_and_refuses_new_upgrades() -> R {
    let mut fleet = Fleet::start_with(|c| {
        c.drain_spread = Duration::from_millis(4000);
        c.drain_timeout = Duration::from_millis(5000);
    })
    .await?;
    let url = fleet.ws_url();
    let admin = fleet.edge_admin();
    let mut clients = Vec::new();
    for i in 0..4 {
        let (c, _) =
            WsClient::connect_ready(&url, &fleet.token(&format!("u{i}"), json!({})), &["switchyard.v1.json"]).await?;
        clients.push(c);
    }
    assert_eq!(http_status(admin, "/readyz").await?, 200);
    // Traffic keeps flowing while the node drains.
    let producer = fleet.producer.clone();
    let traffic = tokio::spawn(async move {
        for i in 0..200u64 {
            let mut payload = Vec::new();
            let ev = json!({"data": i, "target": {"all": true}, "durable": false});
            switchyard_common::transcode::json_to_msgpack(&ev, &mut payload);
            if producer.publish("sy.events.tick", payload.into()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let edge = fleet.edge.take().unwrap();
    let drain = tokio::spawn(async move {
        let gone = edge.drain().await;
        (edge, gone)
    });
    let mut delays = Vec::new();
    for c in &mut clients {
        // Events may still arrive first; then `reconnect`, then the close.
        let f = loop {
            let f = c.frame().await?;
            if f["op"] != "event" && f["op"] != "batch" {
                break f;
            }
        };
        assert_eq!(f["op"], "reconnect", "{f}");
        assert_eq!(f["reason"], "draining");
        delays.push(f["after_ms"].as_u64().context("after_ms")?);
        match c.next().await? {
            Incoming::Closed(code, _) => assert_eq!(code, 1001),
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
    delays.sort_unstable();
    assert!(delays.iter().all(|d| *d < 4000), "{delays:?}");
    assert!(delays[3] > delays[0], "delays are not spread: {delays:?}");
    let (edge, gone) = drain.await?;
    traffic.abort();
    assert!(gone, "connections still open after drain");
    assert_eq!(http_status(admin, "/readyz").await?, 503);
    assert_eq!(http_status(admin, "/healthz").await?, 200);
    let opts = Connect {
        bearer: Some(fleet.token("late", json!({}))),
        ..Default::default()
    };
    assert_eq!(
        WsClient::connect(&url, &opts).await.err(),
        Some(ConnectError::Status(503))
    );
    edge.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn expired_token_closes_4010_unless_refreshed() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let short = switchyard_tests::tokens::token(switchyard_tests::fleet::TEST_SECRET, "alice", 2, json!({}));
    let (mut c, _) = WsClient::connect_ready(&url, &short, &["switchyard.v1.json"]).await?;
    let err = c.expect_op("error").await?;
    assert_eq!(err["code"], "token_expired");
    assert_eq!(c.expect_close().await?, 4010);

    // Refreshed in time: the connection lives on past the first token's expiry.
    let short = switchyard_tests::tokens::token(switchyard_tests::fleet::TEST_SECRET, "bob", 2, json!({}));
    let (mut c, _) = WsClient::connect_ready(&url, &short, &["switchyard.v1.json"]).await?;
    c.ok(json!({"op":"auth","token": fleet.token("bob", json!({}))}), 1)
        .await?;
    // A bad refresh is refused and the connection keeps its claims.
    let r = c.request(json!({"op":"auth","token":"garbage"}), 2).await?;
    assert_eq!(r["code"], "unauthorized");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(c.request(json!({"op":"ping"}), 3).await?["op"], "pong");
    // A refresh for another user closes 4001.
    c.send(&json!({"op":"auth","id":4,"token": fleet.token("mallory", json!({}))}))
        .await?;
    assert_eq!(c.expect_op("error").await?["code"], "unauthorized");
    assert_eq!(c.expect_close().await?, 4001);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn silent_clients_are_closed_4000_after_two_heartbeats() -> R {
    let fleet = Fleet::start_with(|c| c.heartbeat = Duration::from_millis(300)).await?;
    let (mut c, ready) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    assert_eq!(ready["heartbeat_ms"], 300);
    // Not reading means not answering pings: the server hears nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.expect_close().await?, 4000);
    // A client that keeps talking stays.
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("bob", json!({})), &[]).await?;
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.request(json!({"op":"ping"}), i).await?["op"], "pong");
    }
    fleet.shutdown().await;
    Ok(())
}

/// What a client saw: events (normal, critical), the largest batch, and `dropped` counts by reason.
#[derive(Debug, Default)]
struct Tally {
    normal: u64,
    critical: u64,
    largest_batch: usize,
    rate_limited: u64,
    slow_consumer: u64,
}

/// Reads frames until `done` says the tally is complete.
async fn tally(c: &mut WsClient, done: impl Fn(&Tally) -> bool) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    while !done(&t) {
        let f = c.frame().await?;
        let events = match f["op"].as_str() {
            Some("event") => vec![f],
            Some("batch") => f["events"].as_array().cloned().unwrap_or_default(),
            Some("dropped") => {
                let n = f["count"].as_u64().context("count")?;
                match f["reason"].as_str() {
                    Some("rate_limited") => t.rate_limited += n,
                    Some("slow_consumer") => t.slow_consumer += n,
                    _ => anyhow::bail!("unknown reason in {f}"),
                }
                continue;
            }
            _ => anyhow::bail!("unexpected {f}"),
        };
        t.largest_batch = t.largest_batch.max(events.len());
        for e in events {
            if e["prio"] == "critical" {
                t.critical += 1;
            } else {
                t.normal += 1;
            }
        }
    }
    Ok(t)
}

#[tokio::test]
async fn a_burst_over_the_default_rate_is_batched_cut_and_accounted_for() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, ready) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    assert_eq!(
        (
            ready["limits"]["rate_per_s"].as_u64(),
            ready["limits"]["burst"].as_u64()
        ),
        (Some(100), Some(200))
    );
    let (sent, critical) = (1000u64, 20u64);
    for i in 0..sent {
        let mut ev = json!({"data": i, "target": {"users": ["alice"]}});
        if i % (sent / critical) == 0 {
            ev["prio"] = json!("critical");
        }
        let mut payload = Vec::new();
        switchyard_common::transcode::json_to_msgpack(&ev, &mut payload);
        fleet.producer.publish("sy.events.alert", payload.into()).await?;
    }
    fleet.producer.flush().await?;
    let normal_sent = sent - critical;
    let t = tally(&mut c, |t| {
        t.critical == critical && t.normal + t.rate_limited + t.slow_consumer == normal_sent
    })
    .await?;
    assert_eq!(t.critical, critical, "{t:?}");
    assert_eq!(t.normal + t.rate_limited + t.slow_consumer, normal_sent, "{t:?}");
    assert!(
        t.rate_limited >= 500,
        "a 1000-event burst over 100/s, burst 200, cut only {t:?}"
    );
    assert!(t.largest_batch <= 50, "{t:?}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_resumes_without_loss() -> R {
    let fleet = Fleet::start_with(|c| {
        c.queue_events = 8;
        c.slow_consumer = Duration::from_millis(500);
        c.write_stall = Duration::from_secs(20);
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
    })
    .await?;
    let url = fleet.ws_url();
    // A small, fixed receive buffer: what the sockets can absorb stays far
    // below what is sent, whatever this machine's TCP autotuning limits are.
    let small_window = Connect {
        bearer: Some(fleet.token("alice", json!({}))),
        protocols: vec![],
        query: None,
    };
    let mut c = WsClient::connect_with_recv_buffer(&url, &small_window, 64 * 1024)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let ready = c.expect_op("ready").await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    let since = ready["pos"].as_u64().unwrap();
    // 24 MiB of events against a client that reads nothing: socket buffers
    // and the queue fill. Events keep coming (bounded) until the edge has
    // cut the client off: whether the first 24 MiB alone keep the queue full
    // long enough depends on how much the kernel's socket buffers absorb.
    let blob = "x".repeat(60 * 1024);
    let cut = || {
        let text = switchyard_tests::fleet::metrics_handle().render();
        text.lines()
            .filter(|l| l.starts_with("switchyard_edge_closed_total{reason=\"slow consumer\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let cut_before = cut();
    let mut published = 0u64;
    for round in 0..60 {
        let n = if round == 0 { 400 } else { 10 };
        for _ in 0..n {
            fleet
                .publish(
                    "big",
                    &json!({"data": {"i": published, "blob": blob}, "target": {"users": ["alice"]}}),
                )
                .await?;
            published += 1;
        }
        fleet.settle().await?;
        if cut() > cut_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The client keeps not reading for a while (the behaviour under test),
    // then reads what reached it: the edge has cut it with 4009.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = 0;
    let code = loop {
        match c.next().await? {
            Incoming::Closed(code, _) => break code,
            Incoming::Frame(f) => {
                received += match f["op"].as_str() {
                    Some("batch") => f["events"].as_array().map_or(0, |e| e.len()),
                    Some("event") => 1,
                    _ => 0,
                };
            }
        }
    };
    assert_eq!(code, 4009);
    assert!(
        (received as u64) < published,
        "the slow client got everything ({received}); nothing was cut off"
    );
    drop(c);
    // Nothing durable is lost: a resume brings back every one.
    let opts = Connect {
        bearer: Some(fleet.token("alice", json!({}))),
        protocols: vec![],
        query: Some(format!("epoch={epoch}&since={since}")),
    };
    let mut c = WsClient::connect(&url, &opts)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    c.expect_op("ready").await?;
    let mut seen = Vec::new();
    loop {
        let f = c.frame().await?;
        match f["op"].as_str() {
            Some("event") => seen.push(f["data"]["i"].as_u64().context("i")?),
            Some("batch") => {
                for e in f["events"].as_array().context("events")? {
                    seen.push(e["data"]["i"].as_u64().context("i")?);
                }
            }
            Some("resumed") => break,
            _ => anyhow::bail!("unexpected {f}"),
        }
    }
    assert_eq!(seen, (0..published).collect::<Vec<u64>>());
    fleet.shutdown().await;
    Ok(())
}

/// An RSA key pair for RS256 tokens, generated at test time.
fn rsa_key() -> anyhow::Result<(jsonwebtoken::EncodingKey, rsa::RsaPublicKey)> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)?;
    let der = key.to_pkcs1_der()?;
    Ok((
        jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
        key.to_public_key(),
    ))
}

fn jwks(keys: &[(&str, &rsa::RsaPublicKey)]) -> String {
    use base64::Engine;
    use rsa::traits::PublicKeyParts;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, k)| {
            json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                   "n": b64.encode(k.n().to_bytes_be()), "e": b64.encode(k.e().to_bytes_be())})
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn rs256(key: &jsonwebtoken::EncodingKey, kid: Option<&str>, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let claims = json!({"sub": sub, "exp": switchyard_tests::tokens::now_s() + 3600});
    jsonwebtoken::encode(&header, &claims, key).expect("RS256 signing")
}

#[tokio::test]
async fn rs256_by_pem_and_jwks_with_a_rotated_key_picked_up() -> R {
    use rsa::pkcs8::EncodePublicKey;
    let dir = tempfile::tempdir()?;
    let (pem_priv, pem_pub) = rsa_key()?;
    let (a_priv, a_pub) = rsa_key()?;
    let (b_priv, b_pub) = rsa_key()?;
    let pem_path = dir.path().join("pub.pem");
    std::fs::write(&pem_path, pem_pub.to_public_key_pem(rsa::pkcs8::LineEnding::LF)?)?;
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[("a", &a_pub)]))?;
    let fleet = Fleet::start_with(|c| {
        c.jwt_public_key = Some(pem_path.clone());
        c.jwks = Some(jwks_path.clone());
    })
    .await?;
    let url = fleet.ws_url();
    let status = |token: String| {
        let url = url.clone();
        async move {
            match WsClient::connect(
                &url,
                &Connect {
                    bearer: Some(token),
                    ..Default::default()
                },
            )
            .await
            {
                Ok(mut c) => c.expect_op("ready").await.map(|_| 101).unwrap_or(0),
                Err(ConnectError::Status(s)) => s,
                Err(ConnectError::Other(e)) => panic!("{e}"),
            }
        }
    };
    assert_eq!(status(rs256(&pem_priv, None, "alice")).await, 101, "RS256 by PEM key");
    assert_eq!(
        status(rs256(&a_priv, Some("a"), "alice")).await,
        101,
        "RS256 by JWKS kid"
    );
    assert_eq!(status(rs256(&b_priv, Some("b"), "alice")).await, 401, "unknown kid");
    assert_eq!(
        status(rs256(&a_priv, Some("b"), "alice")).await,
        401,
        "wrong key for the kid"
    );

    // Rotate: the file now holds only key b (written aside, then renamed over).
    let tmp = dir.path().join("jwks.json.new");
    std::fs::write(&tmp, jwks(&[("b", &b_pub)]))?;
    std::fs::rename(&tmp, &jwks_path)?;
    let mut picked_up = false;
    for _ in 0..100 {
        if status(rs256(&b_priv, Some("b"), "alice")).await == 101 {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(picked_up, "the rotated key was not picked up");
    assert_eq!(
        status(rs256(&a_priv, Some("a"), "alice")).await,
        401,
        "the retired key still works"
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_backlogged_connection_conflates_keyed_events_and_keeps_the_latest() -> R {
    let fleet = Fleet::start_with(|c| {
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
    })
    .await?;
    let opts = Connect {
        bearer: Some(fleet.token("alice", json!({}))),
        protocols: vec![],
        query: None,
    };
    // A small fixed receive buffer, so the backlog does not depend on this
    // machine's TCP autotuning limits.
    let mut c = WsClient::connect_with_recv_buffer(&fleet.ws_url(), &opts, 64 * 1024)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    c.expect_op("ready").await?;
    // The client reads nothing while 24 MiB of updates for one key arrive:
    // the socket fills, the rest waits in the queue, where each update
    // replaces the previous one.
    let blob = "x".repeat(60 * 1024);
    for i in 0..400u64 {
        fleet
            .publish(
                "quote.AAPL",
                &json!({"data": {"i": i, "blob": blob}, "target": {"users": ["alice"]}}),
            )
            .await?;
    }
    fleet.settle().await?;
    let mut seen: Vec<(u64, u64)> = Vec::new();
    while seen.last().is_none_or(|(i, _)| *i != 399) {
        let f = c.frame().await?;
        let events = match f["op"].as_str() {
            Some("event") => vec![f],
            Some("batch") => f["events"].as_array().cloned().unwrap_or_default(),
            _ => anyhow::bail!("unexpected {f} (conflation is not a drop)"),
        };
        for e in events {
            assert_eq!(e["key"], "AAPL");
            seen.push((e["data"]["i"].as_u64().context("i")?, e["pos"].as_u64().context("pos")?));
        }
    }
    assert!(
        seen.len() < 400,
        "nothing was conflated: {} of 400 delivered",
        seen.len()
    );
    for w in seen.windows(2) {
        assert!(
            w[0].0 < w[1].0 && w[0].1 < w[1].1,
            "order broken: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_query_token_counts_only_where_enabled() -> R {
    let fleet = Fleet::start_with(|c| c.auth_timeout = Duration::from_millis(500)).await?;
    let token = fleet.token("alice", json!({}));
    let opts = Connect {
        query: Some(format!("token={token}")),
        protocols: vec!["switchyard.v1.json".into()],
        ..Default::default()
    };
    // Off by default: the token in the URL is ignored, so frame auth is still required.
    let mut c = WsClient::connect(&fleet.ws_url(), &opts)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(c.frame().await?["code"], "unauthorized");
    assert_eq!(c.expect_close().await?, 4001);
    fleet.shutdown().await;

    let fleet = Fleet::start_with(|c| c.allow_query_token = true).await?;
    let token = fleet.token("alice", json!({}));
    let opts = Connect {
        query: Some(format!("token={token}")),
        protocols: vec!["switchyard.v1.json".into()],
        ..Default::default()
    };
    let mut c = WsClient::connect(&fleet.ws_url(), &opts)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(c.expect_op("ready").await?["user"], "alice");
    let bad = Connect {
        query: Some("token=garbage".into()),
        ..Default::default()
    };
    assert_eq!(
        WsClient::connect(&fleet.ws_url(), &bad).await.err(),
        Some(ConnectError::Status(401))
    );
    fleet.shutdown().await;
    Ok(())
}
