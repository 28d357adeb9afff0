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
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let fleet = Fleet::start_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await?;
    let port = fleet.edge.as_ref().unwrap().ws_addr.port();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
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
        c.drain_spread_ms = 4000;
        c.drain_timeout_ms = 5000;
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
    let edge = fleet.edge.take().unwrap();
    let drain = tokio::spawn(async move {
        let gone = edge.drain().await;
        (edge, gone)
    });
    let mut delays = Vec::new();
    for c in &mut clients {
        let f = c.expect_op("reconnect").await?;
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
    let fleet = Fleet::start_with(|c| c.heartbeat_ms = 300).await?;
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

/// Reads frames until `done` says the tally is complete: (normal events, critical events, dropped by reason).
async fn tally(c: &mut WsClient, done: impl Fn(u64, u64, u64) -> bool) -> anyhow::Result<(u64, u64, u64)> {
    let (mut normal, mut critical, mut rate_limited) = (0, 0, 0);
    while !done(normal, critical, rate_limited) {
        let f = c.frame().await?;
        let events = match f["op"].as_str() {
            Some("event") => vec![f],
            Some("batch") => f["events"].as_array().cloned().unwrap_or_default(),
            Some("dropped") => {
                assert_eq!(f["reason"], "rate_limited", "{f}");
                rate_limited += f["count"].as_u64().context("count")?;
                continue;
            }
            _ => anyhow::bail!("unexpected {f}"),
        };
        for e in events {
            if e["prio"] == "critical" {
                critical += 1;
            } else {
                normal += 1;
            }
        }
    }
    Ok((normal, critical, rate_limited))
}

#[tokio::test]
async fn rate_limit_cuts_are_reported_and_critical_events_bypass_it() -> R {
    let fleet = Fleet::start_with(|c| {
        c.rate_per_s = 5;
        c.burst = 5;
    })
    .await?;
    let (mut c, ready) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    assert_eq!(
        (
            ready["limits"]["rate_per_s"].as_u64(),
            ready["limits"]["burst"].as_u64()
        ),
        (Some(5), Some(5))
    );
    for i in 0..30 {
        fleet
            .publish("alert", &json!({"data": i, "target": {"users": ["alice"]}}))
            .await?;
    }
    for i in 0..5 {
        fleet
            .publish(
                "alert",
                &json!({"data": i, "prio": "critical", "target": {"users": ["alice"]}}),
            )
            .await?;
    }
    // Received plus reported drops account for every event; critical ones all arrive.
    let (normal, critical, cut) = tally(&mut c, |n, c, d| n + d == 30 && c == 5).await?;
    assert_eq!(critical, 5);
    assert!(cut >= 20, "only {cut} of 30 cut by a 5/s, burst 5 limit");
    assert_eq!(normal + cut, 30);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_resumes_without_loss() -> R {
    let fleet = Fleet::start_with(|c| {
        c.queue_events = 8;
        c.slow_consumer_ms = 500;
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
    })
    .await?;
    let url = fleet.ws_url();
    let (c, ready) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    let since = ready["pos"].as_u64().unwrap();
    // 24 MiB of events against a client that reads nothing: socket buffers and the queue fill.
    let blob = "x".repeat(60 * 1024);
    for i in 0..400 {
        fleet
            .publish(
                "big",
                &json!({"data": {"i": i, "blob": blob}, "target": {"users": ["alice"]}}),
            )
            .await?;
    }
    fleet.settle().await?;
    // The client keeps not reading for a while (the behaviour under test),
    // then reads what reached it: the edge has given up on the connection,
    // either with close 4009 or by dropping a socket that stayed stalled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut c = c;
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
    assert!(code == 4009 || code == 1006, "closed with {code}");
    assert!(
        received < 400,
        "the slow client got everything ({received}); nothing was cut off"
    );
    drop(c);
    // Nothing durable is lost: a resume brings back all 400.
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
    assert_eq!(seen, (0..400).collect::<Vec<u64>>());
    fleet.shutdown().await;
    Ok(())
}
