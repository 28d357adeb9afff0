//! End-to-end tests of the core slice: a real nats-server, a router and an
//! edge, and WebSocket clients over real sockets.

use serde_json::{json, Value};
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::tokens::{alg_none, now_s, sign, token};
use switchyard_tests::ws_client::{Connect, ConnectError, Incoming, WsClient};
use tokio_tungstenite::tungstenite::Message;

type R = anyhow::Result<()>;

const JSON: &[&str] = &["switchyard.v1.json"];
const MSGPACK: &[&str] = &[];

fn marker(kind: &str) -> Value {
    json!({"type": "marker", "data": {"m": kind}, "target": {"all": true}})
}

fn is_marker(e: &Value) -> bool {
    e["type"] == "marker"
}

/// Publishes a broadcast marker and collects every event up to it: since a
/// user's deliveries keep their order, anything published before the marker
/// that was going to arrive has arrived.
async fn until_marker(fleet: &Fleet, clients: &mut [&mut WsClient]) -> anyhow::Result<Vec<Vec<Value>>> {
    // Subjects are processed in parallel partitions: wait until every event
    // published so far is handled, so the marker comes after all of them.
    fleet.settle().await?;
    fleet.publish("marker", &marker("end")).await?;
    let mut all = Vec::new();
    for c in clients.iter_mut() {
        let mut evs = c.events_until(is_marker).await?;
        evs.retain(|e| !is_marker(e));
        all.push(evs);
    }
    Ok(all)
}

#[tokio::test]
async fn header_and_frame_auth_reach_ready() -> R {
    let fleet = Fleet::start().await?;
    let (_c, ready) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    assert_eq!(ready["user"], "alice");
    for field in ["conn", "epoch", "pos", "server_time", "heartbeat_ms"] {
        assert!(!ready[field].is_null(), "ready lacks {field}: {ready}");
    }
    for field in [
        "max_frame_bytes",
        "max_subscriptions",
        "rate_per_s",
        "burst",
        "batch_max_events",
        "batch_max_bytes",
    ] {
        assert!(ready["limits"][field].is_u64(), "limits lack {field}: {ready}");
    }

    let mut c = WsClient::connect(
        &fleet.ws_url(),
        &Connect {
            protocols: vec!["switchyard.v1.json".into()],
            ..Default::default()
        },
    )
    .await
    .expect("upgrade");
    c.send(&json!({"op":"auth","id":1,"token": fleet.token("bob", json!({}))}))
        .await?;
    let ready = c.expect_op("ready").await?;
    assert_eq!(ready["user"], "bob");
    assert_eq!(ready["id"], 1);
    let pong = c.request(json!({"op":"ping"}), 2).await?;
    assert_eq!(pong["op"], "pong");
    assert!(pong["server_time"].as_u64().unwrap() > 0);
    fleet.shutdown().await;
    Ok(())
}

fn bad_tokens() -> Vec<(&'static str, String)> {
    let exp = now_s() + 3600;
    let mut v = vec![
        ("bad signature", token("some-other-secret", "alice", 3600, json!({}))),
        ("expired", token(TEST_SECRET, "alice", -10, json!({}))),
        ("alg none", alg_none(&json!({"sub":"alice","exp":exp}))),
        (
            "missing sub",
            sign(TEST_SECRET, &json!({"exp":exp}), jsonwebtoken::Algorithm::HS256),
        ),
        (
            "missing exp",
            sign(TEST_SECRET, &json!({"sub":"alice"}), jsonwebtoken::Algorithm::HS256),
        ),
        ("garbage", "not.a.token".to_string()),
    ];
    for hostile in ["a.b", "*", ">", "a b", "", &"x".repeat(65)] {
        v.push(("hostile sub", token(TEST_SECRET, hostile, 3600, json!({}))));
    }
    v
}

#[tokio::test]
async fn bad_tokens_are_refused_by_header_and_by_frame() -> R {
    let fleet = Fleet::start().await?;
    for (what, t) in bad_tokens() {
        let opts = Connect {
            bearer: Some(t.clone()),
            ..Default::default()
        };
        match WsClient::connect(&fleet.ws_url(), &opts).await {
            Err(ConnectError::Status(401)) => {}
            Err(e) => panic!("{what}: expected 401, got {e:?}"),
            Ok(_) => panic!("{what}: header token accepted"),
        }
        let mut c = WsClient::connect(
            &fleet.ws_url(),
            &Connect {
                protocols: vec!["switchyard.v1.json".into()],
                ..Default::default()
            },
        )
        .await
        .expect("upgrade");
        c.send(&json!({"op":"auth","token": t})).await?;
        let err = c.frame().await?;
        assert_eq!(
            (err["op"].as_str(), err["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{what}: {err}"
        );
        assert_eq!(c.expect_close().await?, 4001, "{what}");
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn frame_auth_failures_close_4001() -> R {
    let fleet = Fleet::start_with(|c| c.auth_timeout = std::time::Duration::from_millis(300)).await?;
    let url = fleet.ws_url();
    let json_opts = Connect {
        protocols: vec!["switchyard.v1.json".into()],
        ..Default::default()
    };
    // Silence past the auth timeout.
    let mut c = WsClient::connect(&url, &json_opts).await.expect("upgrade");
    assert_eq!(c.frame().await?["code"], "unauthorized");
    assert_eq!(c.expect_close().await?, 4001);
    // Another op first.
    let mut c = WsClient::connect(&url, &json_opts).await.expect("upgrade");
    c.send(&json!({"op":"ping","id":1})).await?;
    assert_eq!(c.frame().await?["code"], "unauthorized");
    assert_eq!(c.expect_close().await?, 4001);
    // A first frame that does not decode.
    let mut c = WsClient::connect(&url, &json_opts).await.expect("upgrade");
    c.send_raw(Message::text("{nope")).await?;
    assert_eq!(c.frame().await?["code"], "unauthorized");
    assert_eq!(c.expect_close().await?, 4001);
    // since without epoch.
    let mut c = WsClient::connect(&url, &json_opts).await.expect("upgrade");
    c.send(&json!({"op":"auth","token": fleet.token("alice", json!({})),"since":3}))
        .await?;
    assert_eq!(c.frame().await?["code"], "bad_frame");
    assert_eq!(c.expect_close().await?, 4001);
    // ...and in the URL, HTTP 400.
    let opts = Connect {
        bearer: Some(fleet.token("alice", json!({}))),
        query: Some("since=3".into()),
        ..Default::default()
    };
    assert_eq!(
        WsClient::connect(&url, &opts).await.err(),
        Some(ConnectError::Status(400))
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn subprotocol_negotiation() -> R {
    let fleet = Fleet::start().await?;
    let t = fleet.token("alice", json!({}));
    let with = |p: &[&str]| Connect {
        bearer: Some(t.clone()),
        protocols: p.iter().map(|s| s.to_string()).collect(),
        query: None,
    };
    assert_eq!(
        WsClient::connect(&fleet.ws_url(), &with(&["mqtt", "stomp"]))
            .await
            .err(),
        Some(ConnectError::Status(400))
    );
    let c = WsClient::connect(
        &fleet.ws_url(),
        &with(&["mqtt", "switchyard.v1.json", "switchyard.v1.msgpack"]),
    )
    .await
    .expect("upgrade");
    assert_eq!(c.encoding, switchyard_common::Encoding::Json);
    let c = WsClient::connect(&fleet.ws_url(), &with(&["switchyard.v1.msgpack", "switchyard.v1.json"]))
        .await
        .expect("upgrade");
    assert_eq!(c.encoding, switchyard_common::Encoding::MsgPack);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn matching_semantics_end_to_end() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    c.ok(json!({"op":"subscribe","sub":"p","type":"tier_patterns","filters":{"symbol":["AAPL","TSLA"],"tier":["daily"]},"min":{"confidence":0.6}}), 1).await?;
    let ev = |n: u32, sym: &str, tier: Option<&str>, conf: f64| {
        let mut m = json!({"symbol": sym, "pattern_type": "BreakoutBO"});
        if let Some(t) = tier {
            m["tier"] = json!(t);
        }
        json!({"data":{"n":n},"target":{"type":"tier_patterns","match":m,"values":{"confidence":conf}}})
    };
    fleet.publish("patterns", &ev(1, "AAPL", Some("daily"), 0.8)).await?;
    fleet.publish("patterns", &ev(2, "AAPL", Some("daily"), 0.5)).await?;
    fleet.publish("patterns", &ev(3, "NVDA", Some("daily"), 0.8)).await?;
    fleet.publish("patterns", &ev(4, "TSLA", None, 0.9)).await?;
    fleet.publish("patterns", &ev(5, "TSLA", Some("daily"), 0.6)).await?;
    let got = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    let ns: Vec<u64> = got.iter().map(|e| e["data"]["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, [1, 5]);
    assert_eq!(got[0]["type"], "patterns");
    assert_eq!(got[0]["sub"], json!(["p"]));
    assert!(got[0]["ts"].as_u64().unwrap() > 0);

    // Upsert by name: the same name replaces (now any symbol, max bound only).
    c.ok(
        json!({"op":"subscribe","sub":"p","type":"tier_patterns","max":{"confidence":0.7}}),
        2,
    )
    .await?;
    let list = c.request(json!({"op":"list"}), 3).await?;
    assert_eq!(list["op"], "subs");
    assert_eq!(
        list["subs"],
        json!([{"sub":"p","type":"tier_patterns","filters":{},"min":{},"max":{"confidence":0.7}}])
    );
    fleet.publish("patterns", &ev(6, "NVDA", None, 0.7)).await?;
    fleet.publish("patterns", &ev(7, "NVDA", None, 0.71)).await?;
    fleet
        .publish(
            "patterns",
            &json!({"data":{"n":8},"target":{"type":"tier_patterns","match":{"symbol":"X"}}}),
        )
        .await?;
    let got = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    assert_eq!(
        got.iter().map(|e| e["data"]["n"].as_u64().unwrap()).collect::<Vec<_>>(),
        [6]
    );

    // A second subscription matching the same event: one delivery naming both, fields unioned.
    c.ok(
        json!({"op":"subscribe","sub":"all_ticks","type":"tick","fields":["px"]}),
        4,
    )
    .await?;
    c.ok(
        json!({"op":"subscribe","sub":"aapl","type":"tick","filters":{"symbol":["AAPL"]},"fields":["sym"]}),
        5,
    )
    .await?;
    fleet
        .publish(
            "tick.AAPL",
            &json!({"data":{"px":1.5,"sym":"AAPL","vol":9},"target":{"match":{"symbol":"AAPL"}}}),
        )
        .await?;
    fleet
        .publish(
            "tick.MSFT",
            &json!({"data":{"px":2.5,"sym":"MSFT","vol":9},"target":{"match":{"symbol":"MSFT"}}}),
        )
        .await?;
    let mut got = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    assert_eq!(got.len(), 2, "{got:?}");
    // Two keyed subjects: no order between them.
    got.sort_by_key(|e| e["key"].as_str().unwrap_or_default().to_string());
    assert_eq!(got[0]["sub"], json!(["aapl", "all_ticks"]));
    assert_eq!(got[0]["data"], json!({"px":1.5,"sym":"AAPL"}));
    assert_eq!(got[0]["key"], "AAPL");
    assert_eq!(got[1]["sub"], json!(["all_ticks"]));
    assert_eq!(got[1]["data"], json!({"px":2.5}));

    // Unsubscribe stops matches; unknown names are fine; malformed names are invalid_filter.
    c.ok(json!({"op":"unsubscribe","sub":"all_ticks"}), 6).await?;
    c.ok(json!({"op":"unsubscribe","sub":"aapl"}), 7).await?;
    c.ok(json!({"op":"unsubscribe","sub":"never-existed"}), 8).await?;
    assert_eq!(
        c.request(json!({"op":"unsubscribe","sub":"a.b"}), 9).await?["code"],
        "invalid_filter"
    );
    fleet
        .publish(
            "tick.AAPL",
            &json!({"data":{"px":1},"target":{"match":{"symbol":"AAPL"}}}),
        )
        .await?;
    assert!(until_marker(&fleet, &mut [&mut c]).await?[0].is_empty());

    // Invalid subscriptions.
    for (i, bad) in [
        json!({"op":"subscribe","sub":"s","type":"Bad"}),
        json!({"op":"subscribe","sub":"s","type":"t","filters":{"symbol":[]}}),
        json!({"op":"subscribe","sub":"s","type":"t","min":{"c":"x"}}),
        json!({"op":"subscribe","sub":"bad name","type":"t"}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = c.request(bad.clone(), 100 + i as u32).await?;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("invalid_filter")),
            "{bad}"
        );
    }
    fleet.shutdown().await;
    Ok(())
}

/// docs/PROTOCOL.md, "Client ops" (1.1): at most 1024 filter values per subscription, its
/// dimensions together; and (an operator bound) at most so many distinct
/// dimension names per subscription type.
#[tokio::test]
async fn subscriptions_are_bounded_in_values_and_dimensions() -> R {
    let fleet = Fleet::start_custom(|r| r.max_type_dimensions = 3, |_| {}).await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), JSON).await?;
    let values = |n: usize| (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>();
    c.ok(
        json!({"op":"subscribe","sub":"wide","type":"t","filters":{"a":values(1000),"b":values(24)}}),
        1,
    )
    .await?;
    for (i, filters) in [json!({"a": values(1025)}), json!({"a": values(1000), "b": values(25)})]
        .into_iter()
        .enumerate()
    {
        let r = c
            .request(
                json!({"op":"subscribe","sub":"wider","type":"t","filters":filters}),
                10 + i as u32,
            )
            .await?;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("invalid_filter")),
            "{r}"
        );
        assert!(r["message"].as_str().unwrap_or_default().contains("1024"), "{r}");
    }
    // Type `t` filters on a and b; one more name fits, a fourth does not.
    c.ok(json!({"op":"subscribe","sub":"c","type":"t","filters":{"c":["x"]}}), 2)
        .await?;
    let r = c
        .request(json!({"op":"subscribe","sub":"d","type":"t","filters":{"d":["x"]}}), 3)
        .await?;
    assert_eq!(r["code"], "invalid_filter", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("distinct dimensions"),
        "{r}"
    );
    c.ok(
        json!({"op":"subscribe","sub":"d","type":"t","filters":{"a":["x"],"c":["y"]}}),
        4,
    )
    .await?;
    c.ok(json!({"op":"subscribe","sub":"e","type":"u","filters":{"d":["x"]}}), 5)
        .await?;
    let subs = c.request(json!({"op":"list"}), 6).await?;
    let names: Vec<&str> = subs["subs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["sub"].as_str())
        .collect();
    assert_eq!(names, ["c", "d", "e", "wide"]);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn all_four_target_kinds() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut alice, _) =
        WsClient::connect_ready(&url, &fleet.token("alice", json!({"rooms":["desk:*"]})), MSGPACK).await?;
    let (mut bob, _) = WsClient::connect_ready(&url, &fleet.token("bob", json!({"rooms":["lobby"]})), JSON).await?;
    alice.ok(json!({"op":"join","room":"desk:fx"}), 1).await?;
    assert_eq!(
        alice.request(json!({"op":"join","room":"lobby"}), 2).await?["code"],
        "forbidden"
    );
    assert_eq!(
        alice.request(json!({"op":"join","room":"desk:"}), 3).await?["code"],
        "forbidden"
    );
    assert_eq!(
        alice.request(json!({"op":"join","room":"bad room"}), 4).await?["code"],
        "invalid_filter"
    );
    bob.ok(json!({"op":"join","room":"lobby"}), 1).await?;
    bob.ok(
        json!({"op":"subscribe","sub":"fx","type":"quote","filters":{"pair":["EURUSD"]}}),
        2,
    )
    .await?;

    fleet
        .publish("direct", &json!({"data":"to alice","target":{"users":["alice"]}}))
        .await?;
    fleet
        .publish(
            "direct",
            &json!({"data":"to both","target":{"users":["alice","bob","carol"]}}),
        )
        .await?;
    fleet
        .publish("chat", &json!({"data":"desk","target":{"room":"desk:fx"}}))
        .await?;
    fleet
        .publish("chat", &json!({"data":"lobby","target":{"room":"lobby"}}))
        .await?;
    fleet
        .publish("news", &json!({"data":"everyone","target":{"all":true}}))
        .await?;
    fleet
        .publish("quote", &json!({"data":"eur","target":{"match":{"pair":"EURUSD"}}}))
        .await?;
    let got = until_marker(&fleet, &mut [&mut alice, &mut bob]).await?;
    let data = |evs: &Vec<Value>| {
        evs.iter()
            .map(|e| e["data"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // Events on different subjects have no order among them (docs/PROTOCOL.md, "Server frames"):
    // compare as sets, and check the order of the two on one subject.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(data(&got[0])), ["desk", "everyone", "to alice", "to both"]);
    assert_eq!(sorted(data(&got[1])), ["eur", "everyone", "lobby", "to both"]);
    let alice_direct: Vec<String> = data(&got[0]).into_iter().filter(|d| d.starts_with("to ")).collect();
    assert_eq!(alice_direct, ["to alice", "to both"]);

    // Leave stops room events.
    alice.ok(json!({"op":"leave","room":"desk:fx"}), 5).await?;
    fleet
        .publish("chat", &json!({"data":"desk2","target":{"room":"desk:fx"}}))
        .await?;
    assert!(until_marker(&fleet, &mut [&mut alice]).await?[0].is_empty());
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn every_connection_of_a_user_gets_each_event_once() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let t = fleet.token("alice", json!({}));
    let (mut tab1, _) = WsClient::connect_ready(&url, &t, MSGPACK).await?;
    let (mut tab2, _) = WsClient::connect_ready(&url, &t, JSON).await?;
    tab1.ok(json!({"op":"subscribe","sub":"t","type":"tick"}), 1).await?;
    for i in 0..20 {
        fleet
            .publish("tick", &json!({"data":{"i":i},"target":{"match":{}}}))
            .await?;
    }
    for evs in until_marker(&fleet, &mut [&mut tab1, &mut tab2]).await? {
        let is: Vec<u64> = evs.iter().map(|e| e["data"]["i"].as_u64().unwrap()).collect();
        assert_eq!(is, (0..20).collect::<Vec<u64>>());
    }
    // Unsubscribe on one tab applies to all.
    tab2.ok(json!({"op":"unsubscribe","sub":"t"}), 1).await?;
    fleet
        .publish("tick", &json!({"data":{"i":99},"target":{"match":{}}}))
        .await?;
    for evs in until_marker(&fleet, &mut [&mut tab1, &mut tab2]).await? {
        assert!(evs.is_empty(), "{evs:?}");
    }
    // Closing one tab leaves the other served.
    drop(tab1);
    fleet
        .publish("direct", &json!({"data":"still here","target":{"users":["alice"]}}))
        .await?;
    let evs = until_marker(&fleet, &mut [&mut tab2]).await?.remove(0);
    assert_eq!(evs.len(), 1);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn json_subprotocol_transcodes_payloads() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, ready) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), JSON).await?;
    assert_eq!(ready["op"], "ready");
    // A MessagePack payload with a binary value and an integer key, published raw.
    let mut payload = vec![0x82];
    payload.extend_from_slice(&[0xa6]);
    payload.extend_from_slice(b"target");
    payload.extend_from_slice(&[0x81, 0xa5]);
    payload.extend_from_slice(b"users");
    payload.extend_from_slice(&[0x91, 0xa5]);
    payload.extend_from_slice(b"alice");
    payload.extend_from_slice(&[0xa4]);
    payload.extend_from_slice(b"data");
    payload.extend_from_slice(&[0x82, 0x01, 0xc4, 0x02, 0xff, 0x00, 0xa1, b'f', 0xcb]);
    payload.extend_from_slice(&f64::NAN.to_be_bytes());
    fleet.publish_raw("bin", payload, false).await?;
    // A JSON producer.
    fleet
        .publish_raw(
            "js",
            br#"{"data":{"big":12345678901,"f":1.5,"e":1e2},"target":{"users":["alice"]}}"#.to_vec(),
            true,
        )
        .await?;
    let evs = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    assert_eq!(evs.len(), 2, "{evs:?}");
    // Two subjects: no order between them.
    let of_type = |t: &str| evs.iter().find(|e| e["type"] == t).cloned().unwrap_or_default();
    assert_eq!(of_type("bin")["data"], json!({"1":"/wA=","f":null}));
    assert_eq!(of_type("js")["data"], json!({"big":12345678901u64,"f":1.5,"e":100.0}));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn msgpack_clients_get_producer_bytes_untouched() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    // data = {"x": bin[1,2,3], "y": ext(5, [9])}
    let data = [0x82, 0xa1, b'x', 0xc4, 0x03, 1, 2, 3, 0xa1, b'y', 0xd4, 0x05, 0x09];
    let mut payload = vec![0x82, 0xa6];
    payload.extend_from_slice(b"target");
    payload.extend_from_slice(&[0x81, 0xa3, b'a', b'l', b'l', 0xc3, 0xa4]);
    payload.extend_from_slice(b"data");
    payload.extend_from_slice(&data);
    fleet.publish_raw("raw", payload, false).await?;
    let ev = c.events_until(|_| true).await?.remove(0);
    assert_eq!(ev["data"], json!({"x":"AQID","y":{"$ext":5,"base64":"CQ=="}}));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_frame_naming_another_user_changes_nothing_for_them() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut alice, _) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), MSGPACK).await?;
    let (mut bob, _) = WsClient::connect_ready(&url, &fleet.token("bob", json!({})), MSGPACK).await?;
    alice
        .ok(
            json!({"op":"subscribe","sub":"s","type":"tick","user":"bob","sub_user":"bob"}),
            1,
        )
        .await?;
    alice
        .ok(json!({"op":"subscribe","sub":"s2","type":"tick","user_id":"bob"}), 2)
        .await?;
    assert_eq!(bob.request(json!({"op":"list"}), 1).await?["subs"], json!([]));
    assert_eq!(
        alice.request(json!({"op":"list"}), 3).await?["subs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    fleet.publish("tick", &json!({"data":1,"target":{"match":{}}})).await?;
    let got = until_marker(&fleet, &mut [&mut alice, &mut bob]).await?;
    assert_eq!(got[0].len(), 1);
    assert!(got[1].is_empty());
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn malformed_client_frames_get_bad_frame_and_the_connection_stays_usable() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    let cases: Vec<(Message, Option<u64>)> = vec![
        (Message::binary(vec![0xc1]), None),
        (Message::binary(vec![0x93, 1, 2, 3]), None),
        (Message::text(r#"{"op":"ping"}"#), None),
        (Message::binary(mp(&json!({"op":"teleport","id":5}))), Some(5)),
        (Message::binary(mp(&json!({"op":"ping","id":-1}))), None),
        (Message::binary(mp(&json!({"op":"ping","id":"x"}))), None),
        (
            Message::binary(mp(&json!({"op":"subscribe","id":6,"type":"t"}))),
            Some(6),
        ),
        (Message::binary(mp(&json!({"id":7}))), Some(7)),
        (Message::binary(mp(&json!({"op":7,"id":8}))), Some(8)),
    ];
    for (msg, id) in cases {
        c.send_raw(msg.clone()).await?;
        let r = c.frame().await?;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("bad_frame")),
            "{msg:?}: {r}"
        );
        assert_eq!(r["id"].as_u64(), id, "{msg:?}: {r}");
    }
    assert_eq!(c.request(json!({"op":"ping"}), 42).await?["op"], "pong");
    c.ok(json!({"op":"subscribe","sub":"s","type":"tick"}), 43).await?;
    fleet.shutdown().await;
    Ok(())
}

fn mp(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    switchyard_common::transcode::json_to_msgpack(v, &mut out);
    out
}

#[tokio::test]
async fn bad_frame_budget_and_frame_size_limit_close_4008() -> R {
    let fleet = Fleet::start_with(|c| c.bad_frame_budget = 3).await?;
    let t = fleet.token("alice", json!({}));
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &t, MSGPACK).await?;
    for _ in 0..3 {
        c.send_raw(Message::binary(vec![0xc1])).await?;
        assert_eq!(c.frame().await?["code"], "bad_frame");
    }
    c.send_raw(Message::binary(vec![0xc1])).await?;
    assert_eq!(c.expect_close().await?, 4008);

    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &t, MSGPACK).await?;
    c.send_raw(Message::binary(vec![0u8; 70_000])).await?;
    assert_eq!(c.expect_close().await?, 4008);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn malformed_producer_events_are_dropped_and_later_ones_arrive() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    fleet.publish_raw("tick", vec![0xc1, 0x00], false).await?;
    fleet.publish_raw("tick", b"{not json".to_vec(), true).await?;
    fleet.publish("tick", &json!({"data":1})).await?;
    fleet
        .publish("tick", &json!({"data":1,"target":{"users":["a.b"]}}))
        .await?;
    fleet
        .publish("tick", &json!({"data":1,"target":{"match":{"s":7}}}))
        .await?;
    fleet
        .publish(
            "tick",
            &json!({"data":1,"target":{"match":{"s":"x"},"values":{"c":"high"}}}),
        )
        .await?;
    fleet
        .publish("Bad-Type", &json!({"data":1,"target":{"all":true}}))
        .await?;
    fleet.publish("a.b.c", &json!({"data":1,"target":{"all":true}})).await?;
    fleet
        .publish("tick", &json!({"data":"valid","target":{"users":["alice"]}}))
        .await?;
    let evs = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["data"], "valid");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn duplicate_producer_ids_are_delivered_once() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    for _ in 0..3 {
        fleet
            .publish(
                "alert",
                &json!({"id":"evt-1","data":"once","target":{"users":["alice"]}}),
            )
            .await?;
    }
    fleet
        .publish(
            "alert",
            &json!({"id":"evt-2","data":"twice","target":{"users":["alice"]}}),
        )
        .await?;
    let evs = until_marker(&fleet, &mut [&mut c]).await?.remove(0);
    assert_eq!(
        evs.iter().map(|e| e["data"].as_str().unwrap()).collect::<Vec<_>>(),
        ["once", "twice"]
    );
    assert_eq!(evs[0]["id"], "evt-1");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn rpc_reaches_the_application_with_the_verified_user() -> R {
    let fleet = Fleet::start_with(|c| c.request_timeout = std::time::Duration::from_millis(500)).await?;
    let app = fleet.producer.clone();
    let mut calls = app.subscribe("sy.rpc.orders.place").await?;
    app.flush().await?;
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(msg) = calls.next().await {
            let v: rmpv::Value = rmpv::decode::read_value(&mut &msg.payload[..]).unwrap();
            let user = switchyard_common::value::get(v.as_map().unwrap(), "user")
                .unwrap()
                .as_str()
                .unwrap()
                .to_string();
            let reply = rmpv::Value::Map(vec![(
                rmpv::Value::from("data"),
                rmpv::Value::from(format!("placed for {user}")),
            )]);
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &reply).unwrap();
            app.publish(msg.reply.unwrap(), buf.into()).await.unwrap();
        }
    });
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), JSON).await?;
    let r = c
        .request(
            json!({"op":"rpc","method":"orders.place","data":{"qty":1},"user":"bob"}),
            1,
        )
        .await?;
    assert_eq!(r, json!({"op":"rpc_result","id":1,"data":"placed for alice"}));
    let r = c
        .request(json!({"op":"rpc","method":"nobody.home","data":{}}), 2)
        .await?;
    assert_eq!(r["code"], "unavailable");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn admin_endpoints_report_health_and_metrics() -> R {
    let fleet = Fleet::start().await?;
    let (_c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    let get = |path: &'static str| {
        let addr = fleet.edge_admin();
        async move {
            let (status, body) = switchyard_tests::fleet::http_get(addr, path).await?;
            anyhow::Ok(format!("HTTP/1.1 {status}\n{body}"))
        }
    };
    assert!(get("/healthz").await?.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await?.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await?;
    assert!(metrics.contains("switchyard_edge_connections_total"), "{metrics}");
    assert!(metrics.contains("switchyard_edge_connections "), "{metrics}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn server_closes_with_1001_on_shutdown() -> R {
    let mut fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), MSGPACK).await?;
    fleet.edge.take().expect("edge").shutdown().await;
    match c.next().await? {
        Incoming::Closed(code, _) => assert_eq!(code, 1001),
        other => panic!("expected close, got {other:?}"),
    }
    fleet.shutdown().await;
    Ok(())
}
