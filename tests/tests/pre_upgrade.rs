//! Connections before their WebSocket upgrade: the handshake timeout (a
//! request head never finished, an idle keep-alive connection, a TLS
//! handshake never started), the node's connection limit counting them, and
//! the per-address cap on them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::{Connect, ConnectError, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Far longer than the short timeouts these tests configure.
const GENEROUS: Duration = Duration::from_secs(8);

/// Half an upgrade request: the head never ends.
const HALF_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\n";

/// Reads until the server ends the connection (EOF or reset), within
/// `GENEROUS`; returns what it sent first.
async fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(GENEROUS, async {
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    ensure!(
        closed.is_ok(),
        "still open after {GENEROUS:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    Ok(got)
}

fn ws_addr(fleet: &Fleet) -> SocketAddr {
    fleet.edge.as_ref().expect("edge").ws_addr
}

/// A connection from a given loopback source address.
async fn connect_from(source: &str, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    Ok(socket.connect(to).await?)
}

#[tokio::test]
async fn an_unfinished_request_is_closed_after_the_handshake_timeout() -> Result<()> {
    let fleet = Fleet::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await?;
    let mut s = TcpStream::connect(ws_addr(&fleet)).await?;
    s.write_all(HALF_REQUEST).await?;
    let got = read_until_closed(&mut s).await?;
    assert!(!got.starts_with(b"HTTP/1.1 101"), "upgraded without a whole request");
    // Nothing at all is the same.
    let mut silent = TcpStream::connect(ws_addr(&fleet)).await?;
    read_until_closed(&mut silent).await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_handshake_timeout() -> Result<()> {
    let fleet = Fleet::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await?;
    let mut s = TcpStream::connect(ws_addr(&fleet)).await?;
    s.write_all(b"GET /nothing-here HTTP/1.1\r\nHost: edge\r\n\r\n").await?;
    let got = read_until_closed(&mut s).await?;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_tls_handshake_never_started_is_closed_after_the_handshake_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cert = switchyard_tests::fleet::write_test_certificate(dir.path())?;
    let fleet = Fleet::start_with(|c| {
        cert.serve(c);
        c.handshake_timeout = Duration::from_millis(300);
    })
    .await?;
    let mut s = TcpStream::connect(ws_addr(&fleet)).await?;
    let got = read_until_closed(&mut s).await?;
    assert!(got.is_empty(), "the server spoke first: {got:?}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connections_waiting_for_their_upgrade_count_against_the_node_limit() -> Result<()> {
    let fleet = Fleet::start_with(|c| {
        c.max_connections = 2;
        // Long enough that the half-open connections stay for the whole test.
        c.handshake_timeout = Duration::from_millis(120_000);
    })
    .await?;
    let addr = ws_addr(&fleet);
    // Accepted in order: both take the node's two slots before the upgrade below.
    let mut half_open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(HALF_REQUEST).await?;
        half_open.push(s);
    }
    let opts = Connect {
        bearer: Some(fleet.token("alice", json!({}))),
        ..Default::default()
    };
    let url = fleet.ws_url();
    assert_eq!(
        WsClient::connect(&url, &opts).await.err(),
        Some(ConnectError::Status(503))
    );
    // One of them goes: its slot comes back.
    drop(half_open.pop());
    let mut upgraded = None;
    for _ in 0..100 {
        if let Ok(c) = WsClient::connect(&url, &opts).await {
            upgraded = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = upgraded.context("slot not released when a half-open connection closed")?;
    c.expect_op("ready").await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn one_address_may_hold_only_so_many_connections_before_their_upgrade() -> Result<()> {
    let fleet = Fleet::start_with(|c| {
        c.max_pending_per_addr = 3;
        c.handshake_timeout = Duration::from_millis(120_000);
    })
    .await?;
    let addr = ws_addr(&fleet);
    let url = fleet.ws_url();
    // Upgraded connections leave the count.
    let mut upgraded = Vec::new();
    for user in ["a", "b", "c", "d"] {
        upgraded.push(
            WsClient::connect_ready(&url, &fleet.token(user, json!({})), &[])
                .await?
                .0,
        );
    }
    let mut half_open = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", addr).await?;
        s.write_all(HALF_REQUEST).await?;
        half_open.push(s);
    }
    // The fourth from 127.0.0.1 is closed at once, with nothing said.
    let mut over = connect_from("127.0.0.1", addr).await?;
    let got = read_until_closed(&mut over).await?;
    assert!(got.is_empty(), "{got:?}");
    // Another address is not affected.
    let mut other = connect_from("127.0.0.2", addr).await?;
    other
        .write_all(b"GET /elsewhere HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        .await?;
    let got = read_until_closed(&mut other).await?;
    assert!(got.starts_with(b"HTTP/1.1 404"), "{}", String::from_utf8_lossy(&got));
    // When one of the three goes, 127.0.0.1 may connect again.
    drop(half_open.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut s = connect_from("127.0.0.1", addr).await?;
        s.write_all(b"GET /elsewhere HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
            .await?;
        if read_until_closed(&mut s).await?.starts_with(b"HTTP/1.1 404") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the address's place did not come back");
    for mut c in upgraded {
        c.send(&json!({"op":"ping","id":1})).await?;
        c.expect_op("pong").await?;
    }
    fleet.shutdown().await;
    Ok(())
}
