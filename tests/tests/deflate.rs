//! permessage-deflate (RFC 7692) against a real fleet: what a client that
//! offers it gets (compressed frames that inflate to valid events, small
//! frames plain), what it may send (compressed requests), what a client
//! that does not offer it gets (no RSV1), and the closes for bad
//! compressed data (1007) and bombs (4008). The client is the harness's
//! raw one ([`RawWs`]): tungstenite here cannot deflate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use switchyard_common::transcode::{json_to_msgpack, msgpack_to_json};
use switchyard_tests::deflate_client::{compress, inflate_with, Message, RawWs};
use switchyard_tests::fleet::{http_get, metric, Fleet};

type R = Result<()>;

/// What every wait here is bounded by.
const WAIT: Duration = Duration::from_secs(20);

/// The answer to a plain offer: no context takeover either way.
const DEFAULT_ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn addr(fleet: &Fleet) -> SocketAddr {
    fleet.edge.as_ref().expect("edge running").ws_addr
}

/// Connects `user` with a header token, offering `offer` (if any) and the JSON subprotocol if `json`.
async fn connect(fleet: &Fleet, user: &str, offer: Option<&str>, json: bool) -> Result<RawWs> {
    let bearer = format!("Bearer {}", fleet.token(user, json!({})));
    let mut headers = vec![("Authorization", bearer.as_str())];
    if let Some(o) = offer {
        headers.push(("Sec-WebSocket-Extensions", o));
    }
    if json {
        headers.push(("Sec-WebSocket-Protocol", "switchyard.v1.json"));
    }
    tokio::time::timeout(WAIT, RawWs::connect(addr(fleet), "/ws", &headers)).await?
}

/// A payload as JSON, whatever the encoding.
fn decode(payload: &[u8], json: bool) -> Result<Value> {
    if json {
        return Ok(serde_json::from_str(std::str::from_utf8(payload)?)?);
    }
    let mut text = Vec::new();
    msgpack_to_json(payload, &mut text)?;
    Ok(serde_json::from_slice(&text)?)
}

/// Reads data messages until one whose op is `op`: its frame's RSV1, wire size and value.
async fn until_op(ws: &mut RawWs, op: &str, json: bool) -> Result<(bool, usize, Value)> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.read_message().await? {
                Message::Data {
                    compressed,
                    payload,
                    wire_bytes,
                    ..
                } => {
                    let v = decode(&payload, json)?;
                    if v["op"] == op {
                        return Ok((compressed, wire_bytes, v));
                    }
                }
                Message::Close(code, reason) => bail!("closed ({code} {reason}) before {op}"),
                _ => {}
            }
        }
    })
    .await?
}

/// Reads until the server's close frame: its code.
async fn until_close(ws: &mut RawWs) -> Result<u16> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.read_message().await {
                Ok(Message::Close(code, _)) => return Ok(code),
                Ok(_) => {}
                Err(e) => bail!("no close frame: {e:#}"),
            }
        }
    })
    .await?
}

/// An event for `user` with a repetitive `data` of about `n` bytes.
fn event_for(user: &str, n: usize) -> Value {
    json!({"type": "note", "data": {"text": "tick EURUSD 1.0842 ".repeat(n / 19 + 1)}, "target": {"users": [user]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offering_client_gets_large_frames_compressed_and_small_ones_plain() -> R {
    let fleet = Fleet::start().await?;
    for json in [false, true] {
        let user = if json { "alice-json" } else { "alice" };
        let mut ws = connect(&fleet, user, Some("permessage-deflate; client_max_window_bits"), json).await?;
        assert_eq!(ws.extensions.as_deref(), Some(DEFAULT_ANSWER));
        until_op(&mut ws, "ready", json).await?;
        fleet.publish("note", &event_for(user, 2000)).await?;
        let (compressed, wire, ev) = until_op(&mut ws, "event", json).await?;
        assert!(compressed, "a 2 KB event goes with RSV1");
        assert!(wire < 400, "it took {wire} bytes on the wire");
        assert_eq!(ev["type"], "note");
        assert!(ev["data"]["text"].as_str().unwrap().starts_with("tick EURUSD"));
        fleet
            .publish("note", &json!({"type":"note","data":1,"target":{"users":[user]}}))
            .await?;
        let (compressed, _, ev) = until_op(&mut ws, "event", json).await?;
        assert!(!compressed, "a small event goes plain");
        assert_eq!(ev["data"], 1);
    }
    let (_, page) = http_get(fleet.edge_admin(), "/metrics").await?;
    let (inb, outb) = (
        metric(&page, "switchyard_edge_deflate_bytes_in_total"),
        metric(&page, "switchyard_edge_deflate_bytes_out_total"),
    );
    assert!(inb > 4000.0 && outb > 0.0 && outb < inb / 4.0, "in {inb}, out {outb}");
    assert!(metric(&page, "switchyard_edge_deflate_connections_total") >= 2.0);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_client_requests_are_understood() -> R {
    let fleet = Fleet::start().await?;
    for json in [false, true] {
        let mut ws = connect(&fleet, "bob", Some("permessage-deflate"), json).await?;
        until_op(&mut ws, "ready", json).await?;
        let encode = |frame: &Value| -> (u8, Vec<u8>) {
            if json {
                (1, serde_json::to_vec(frame).expect("JSON"))
            } else {
                let mut b = Vec::new();
                json_to_msgpack(frame, &mut b);
                (2, b)
            }
        };
        let ping = json!({"op": "ping", "id": 7});
        let sub = json!({"op":"subscribe","id":8,"sub":"fx","type":"quote","filters":{"pair":["EURUSD"]}});
        for (frame, op) in [(&ping, "pong"), (&sub, "ok")] {
            let (opcode, bytes) = encode(frame);
            ws.send(opcode, &bytes, true).await?;
            let (_, _, reply) = until_op(&mut ws, op, json).await?;
            assert_eq!(reply["id"], frame["id"], "{reply}");
        }
        // Fragmented: RSV1 on the first frame only.
        let (opcode, bytes) = encode(&json!({"op":"ping","id":9}));
        let data = compress(&bytes);
        let (a, b) = data.split_at(data.len() / 2);
        ws.send_frame(0x40 | opcode, a).await?;
        ws.send_frame(0x80, b).await?;
        let (_, _, reply) = until_op(&mut ws, "pong", json).await?;
        assert_eq!(reply["id"], 9, "{reply}");
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_offer_gets_no_rsv1_and_offers_can_be_declined() -> R {
    let fleet = Fleet::start().await?;
    for offer in [
        None,
        Some("x-webkit-deflate-frame"),
        Some("permessage-deflate; server_max_window_bits=8"),
    ] {
        let mut ws = connect(&fleet, "carol", offer, false).await?;
        assert_eq!(ws.extensions, None, "{offer:?}");
        until_op(&mut ws, "ready", false).await?;
        fleet.publish("note", &event_for("carol", 2000)).await?;
        let (compressed, wire, _) = until_op(&mut ws, "event", false).await?;
        assert!(!compressed && wire > 2000, "{offer:?}: plain, {wire} bytes");
        // RSV1 from a client that negotiated nothing breaks RFC 6455.
        ws.send_frame(0x80 | 0x40 | 0x2, &compress(b"\x81\xa2op\xa4ping"))
            .await?;
        assert_eq!(until_close(&mut ws).await?, 1002, "{offer:?}");
    }
    fleet.shutdown().await;
    let off = Fleet::start_with(|c| c.deflate.enabled = false).await?;
    let ws = connect(&off, "carol", Some("permessage-deflate"), false).await?;
    assert_eq!(ws.extensions, None, "SWITCHYARD_DEFLATE=false declines");
    off.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_compressed_data_closes_1007_and_a_bomb_4008() -> R {
    let fleet = Fleet::start().await?;
    let mut ws = connect(&fleet, "dave", Some("permessage-deflate"), false).await?;
    until_op(&mut ws, "ready", false).await?;
    ws.send_frame(0x80 | 0x40 | 0x2, &[0xff, 0xff, 0xff, 0xff]).await?;
    assert_eq!(until_close(&mut ws).await?, 1007);

    // 16 MiB of one byte, compressed to a few KiB: under the 64 KiB frame
    // limit on the wire, far over it inflated.
    let bomb = compress(&vec![b'a'; 16 << 20]);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let mut ws = connect(&fleet, "dave", Some("permessage-deflate"), false).await?;
    until_op(&mut ws, "ready", false).await?;
    ws.send_frame(0x80 | 0x40 | 0x2, &bomb).await?;
    assert_eq!(until_close(&mut ws).await?, 4008);

    // RSV1 on a control frame, even with deflate negotiated.
    let mut ws = connect(&fleet, "dave", Some("permessage-deflate"), false).await?;
    until_op(&mut ws, "ready", false).await?;
    ws.send_frame(0x80 | 0x40 | 0x9, b"").await?;
    assert_eq!(until_close(&mut ws).await?, 1002);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_context_takeover_repeated_events_shrink() -> R {
    let fleet = Fleet::start_with(|c| c.deflate.context_takeover = true).await?;
    let mut ws = connect(&fleet, "erin", Some("permessage-deflate"), false).await?;
    assert_eq!(
        ws.extensions.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );
    until_op(&mut ws, "ready", false).await?;
    let mut sizes = Vec::new();
    for _ in 0..2 {
        fleet.publish("note", &event_for("erin", 2000)).await?;
        let (compressed, wire, ev) = until_op(&mut ws, "event", false).await?;
        assert!(compressed);
        assert_eq!(ev["type"], "note");
        sizes.push(wire);
    }
    assert!(sizes[1] < sizes[0], "the second refers to the first: {sizes:?}");
    // A client asking for no takeover gets none.
    let ws = connect(
        &fleet,
        "erin",
        Some("permessage-deflate; server_no_context_takeover"),
        false,
    )
    .await?;
    assert_eq!(ws.extensions.as_deref(), Some(DEFAULT_ANSWER));
    fleet.shutdown().await;
    Ok(())
}

#[test]
fn the_harness_inflates_what_it_compresses() {
    let mut d = flate2::Decompress::new(false);
    let text = b"hello hello hello hello".repeat(10);
    assert_eq!(inflate_with(&mut d, &compress(&text)).unwrap(), text);
}
