//! The router tier with several routers: persisted subscriptions, the
//! consistency promise behind `ok`, failover without loss or duplicates,
//! dedup across routers, authorization and limits.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::json;
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::WsClient;

type R = anyhow::Result<()>;

/// A router running as its own process, killed (SIGKILL) on drop.
struct RouterProcess {
    child: Child,
}

impl RouterProcess {
    fn binary() -> anyhow::Result<PathBuf> {
        // target/<profile>/deps/<test> → target/<profile>/switchyard-router
        let exe = std::env::current_exe()?;
        let dir = exe.parent().and_then(|d| d.parent()).context("target dir")?;
        let bin = dir.join("switchyard-router");
        if !bin.exists() {
            // `cargo test -p switchyard-tests` alone does not build other packages' binaries.
            // The crash test needs the fault-injection feature (router/src/fault.rs).
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "switchyard-router",
                    "--bin",
                    "switchyard-router",
                    "--features",
                    "fault-injection",
                ])
                .status()?;
            if !status.success() || !bin.exists() {
                bail!("cannot build {}", bin.display());
            }
        }
        Ok(bin)
    }

    fn start(nats_url: &str, envs: &[(&str, &str)]) -> anyhow::Result<RouterProcess> {
        let mut cmd = Command::new(Self::binary()?);
        cmd.env("SWITCHYARD_NATS_URL", nats_url)
            .env("SWITCHYARD_ADMIN_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Ok(RouterProcess { child: cmd.spawn()? })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until all `total` partitions are leased, and (when given) some by router `owner`.
async fn wait_for_owned_partitions(fleet: &Fleet, total: u64, owner: Option<&str>) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(fleet.producer.clone());
    let kv = js.get_key_value("SY_LEASES").await?;
    for _ in 0..200 {
        let mut keys = kv.keys().await?;
        let (mut n, mut by_owner) = (0, 0);
        while let Some(k) = keys.next().await {
            let k = k?;
            n += 1;
            if let (Some(owner), Ok(Some(v))) = (owner, kv.get(k.as_str()).await) {
                by_owner += usize::from(v.as_ref() == owner.as_bytes());
            }
        }
        if n >= total && (owner.is_none() || by_owner > 0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the partitions were not all leased (or not by {owner:?})")
}

#[tokio::test]
async fn a_change_through_one_router_holds_at_the_other_for_the_very_next_event() -> R {
    let fleet = Fleet::start_with(|c| {
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
        // 120 changes in quick succession on one connection.
        c.ops_per_s = 0;
    })
    .await?;
    let second = fleet.start_router(|_| {}).await?;
    let token = fleet.token("alice", json!({"rooms":["room:*"]}));
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &token, &[]).await?;
    // Requests and partitions are spread over both routers at random: over
    // 40 rounds, changes accepted by one router meet events matched by the
    // other many times (the chance they never do is 2^-40).
    for round in 0..40u32 {
        let sym = format!("S{round}");
        c.ok(
            json!({"op":"subscribe","sub":format!("s{round}"),"type":"px","filters":{"symbol":[sym]}}),
            round + 1,
        )
        .await?;
        // Published right after `ok`, on a subject of its own (its own partition).
        fleet
            .publish(
                &format!("px.{sym}"),
                &json!({"data":{"round":round},"target":{"match":{"symbol":sym}}}),
            )
            .await?;
        let ev = c.take_events(1).await?.remove(0);
        assert_eq!(ev["data"]["round"], round, "round {round}: {ev}");
        assert_eq!(ev["sub"], json!([format!("s{round}")]));
        // Room membership likewise.
        let room = format!("room:r{round}");
        c.ok(json!({"op":"join","room":room}), 1000 + round).await?;
        fleet
            .publish(
                &format!("chat.r{round}"),
                &json!({"data":{"room":room},"target":{"room":room}}),
            )
            .await?;
        let ev = c.take_events(1).await?.remove(0);
        assert_eq!(ev["data"]["room"], room.as_str());
    }
    // Unsubscribe through either router stops matches everywhere.
    for round in 0..40u32 {
        c.ok(json!({"op":"unsubscribe","sub":format!("s{round}")}), 2000 + round)
            .await?;
    }
    for round in 0..40u32 {
        let sym = format!("S{round}");
        fleet
            .publish(
                &format!("px.{sym}"),
                &json!({"data":{"round":round},"target":{"match":{"symbol":sym}}}),
            )
            .await?;
    }
    fleet.settle().await?;
    fleet
        .publish("direct", &json!({"data":"end","target":{"users":["alice"]}}))
        .await?;
    let ev = c.take_events(1).await?.remove(0);
    assert_eq!(ev["data"], "end", "a match after unsubscribe: {ev}");
    second.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_router_restart_keeps_every_subscription_and_membership() -> R {
    let mut fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let token = fleet.token("alice", json!({"rooms":["desk:*"]}));
    let (mut c, _) = WsClient::connect_ready(&url, &token, &[]).await?;
    c.ok(
        json!({"op":"subscribe","sub":"a","type":"alert","filters":{"symbol":["AAPL"]},"min":{"confidence":0.5},"fields":["n"]}),
        1,
    )
    .await?;
    c.ok(json!({"op":"join","room":"desk:fx.eu"}), 2).await?;
    let before = c.request(json!({"op":"list"}), 3).await?["subs"].clone();

    // The only router goes away; a new one rebuilds from the bucket.
    fleet.router.take().context("router")?.shutdown().await;
    let router = fleet.start_router(|_| {}).await?;
    fleet.router = Some(router);
    assert_eq!(c.request(json!({"op":"list"}), 4).await?["subs"], before);
    fleet
        .publish(
            "alert",
            &json!({"data":{"n":1,"secret":"x"},"target":{"match":{"symbol":"AAPL"},"values":{"confidence":0.7}}}),
        )
        .await?;
    fleet
        .publish("chat", &json!({"data":{"n":2},"target":{"room":"desk:fx.eu"}}))
        .await?;
    let mut evs = c.take_events(2).await?;
    evs.sort_by_key(|e| e["data"]["n"].as_u64());
    assert_eq!(evs[0]["data"], json!({"n":1}), "fields trimming survives the restart");
    assert_eq!(evs[1]["data"], json!({"n":2}));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn killing_a_router_mid_stream_loses_nothing_and_delivers_nothing_twice() -> R {
    const SUBJECTS: u64 = 8;
    const N: u64 = 2400;
    let fleet = Fleet::start_custom(
        |r| r.lease_ttl = Duration::from_millis(1000),
        |c| {
            c.rate_per_s = 1_000_000;
            c.burst = 1_000_000;
            c.queue_events = 100_000;
        },
    )
    .await?;
    // The victim dies at the worst moment: deliveries of an event stored,
    // the event not yet acknowledged (so it is redone elsewhere).
    let mut victim = RouterProcess::start(
        &fleet.nats.url(),
        &[
            ("SWITCHYARD_LEASE_TTL_MS", "1000"),
            ("SWITCHYARD_ROUTER_ID", "victim"),
            ("SWITCHYARD_TEST_CRASH_AFTER_DELIVERIES", "300"),
        ],
    )?;
    // 2 × 8 partitions; wait until the victim holds some.
    wait_for_owned_partitions(&fleet, 16, Some("victim")).await?;
    // One connected user in every user partition, so whichever ones the
    // victim delivers for, a live client sees the takeover (presence
    // rebuilt from the edge, redone events sent live, nothing twice).
    let users: Vec<String> = (0..)
        .map(|i| format!("user{i}"))
        .scan(std::collections::BTreeSet::new(), |seen, u| {
            Some(
                seen.insert(switchyard_common::fanout::user_partition(&u, 8))
                    .then_some(u),
            )
        })
        .flatten()
        .take(8)
        .collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(
            WsClient::connect_ready(&fleet.ws_url(), &fleet.token(u, json!({})), &[])
                .await?
                .0,
        );
    }

    let producer = async {
        for i in 0..N {
            let s = i % SUBJECTS;
            let ev = json!({"data":{"s":s,"i":i},"target":{"users":users}});
            fleet.publish(&format!("seq{s}"), &ev).await?;
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if i == N / 2 {
                // Had it not crashed by now, it is killed outright.
                victim.kill();
            }
        }
        anyhow::Ok(())
    };
    let consumers = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| async move { tokio::time::timeout(Duration::from_secs(60), c.take_events(N as usize)).await }),
    );
    let (p, all) = tokio::join!(producer, consumers);
    p?;
    for (u, evs) in users.iter().zip(all) {
        let evs = evs
            .with_context(|| format!("{u}: not every event arrived within 60 s"))?
            .with_context(|| u.to_string())?;
        let mut seen = HashSet::new();
        let mut last_in_subject: HashMap<u64, u64> = HashMap::new();
        let mut last_pos = 0;
        for e in &evs {
            let (s, i) = (e["data"]["s"].as_u64().unwrap(), e["data"]["i"].as_u64().unwrap());
            assert!(seen.insert(i), "{u}: event {i} delivered twice");
            if let Some(prev) = last_in_subject.insert(s, i) {
                assert!(prev < i, "{u}: subject seq{s}: {i} after {prev}");
            }
            let pos = e["pos"].as_u64().context("pos")?;
            assert!(pos > last_pos, "{u}: pos not increasing");
            last_pos = pos;
        }
        assert_eq!(seen.len() as u64, N, "{u}");
    }
    // Nothing more arrives (no late duplicate).
    fleet.settle().await?;
    fleet
        .publish("direct", &json!({"data":"end","target":{"users":users}}))
        .await?;
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let last = c.take_events(1).await?.remove(0);
        assert_eq!(last["data"], "end", "{u}: a late extra event: {last}");
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_producer_retry_on_another_subject_and_router_is_delivered_once() -> R {
    let fleet = Fleet::start().await?;
    let second = fleet.start_router(|_| {}).await?;
    wait_for_owned_partitions(&fleet, 16, None).await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    // The same producer id on 8 subjects, which land in several partitions
    // and so on both routers.
    for s in 0..8 {
        fleet
            .publish(
                &format!("order{s}"),
                &json!({"id":"ord-42","data":{"s":s},"target":{"users":["alice"]}}),
            )
            .await?;
    }
    fleet.settle().await?;
    fleet
        .publish("direct", &json!({"data":"end","target":{"users":["alice"]}}))
        .await?;
    let evs = c.events_until(|e| e["data"] == "end").await?;
    assert_eq!(evs.len(), 2, "ord-42 delivered {} times", evs.len() - 1);
    second.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

/// Answers authorization requests: `allow` when the caller has role
/// `premium`; counts the requests it saw in `seen`.
async fn authz_responder(
    client: async_nats::Client,
    subject: &str,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let req: rmpv::Value = rmpv::decode::read_value(&mut &msg.payload[..]).expect("msgpack request");
            let map = req.as_map().expect("map");
            let get = |k: &str| {
                map.iter()
                    .find(|(kk, _)| kk.as_str() == Some(k))
                    .map(|(_, v)| v.clone())
            };
            let premium = get("roles")
                .and_then(|r| r.as_array().cloned())
                .is_some_and(|r| r.iter().any(|x| x.as_str() == Some("premium")));
            assert!(get("user").is_some() && get("kind").is_some());
            let reply = if premium {
                rmpv::Value::Map(vec![("allow".into(), true.into())])
            } else {
                rmpv::Value::Map(vec![
                    ("allow".into(), false.into()),
                    ("message".into(), "premium only".into()),
                ])
            };
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &reply).unwrap();
            if let Some(to) = msg.reply {
                let _ = client.publish(to, buf.into()).await;
            }
        }
    }))
}

#[tokio::test]
async fn authorization_by_claims_public_lists_and_the_application() -> R {
    let fleet = Fleet::start_custom(
        |r| {
            r.public_rooms = vec!["lobby".into(), "public:*".into()];
            r.public_types = vec!["tick".into(), "market_*".into()];
            r.authz_request = true;
            r.authz_timeout = Duration::from_millis(300);
            r.max_dimensions = 2;
            r.max_values_per_dimension = 3;
        },
        |_| {},
    )
    .await?;
    let url = fleet.ws_url();
    let (mut plain, _) = WsClient::connect_ready(&url, &fleet.token("alice", json!({"rooms":["desk:*"]})), &[]).await?;
    let (mut premium, _) =
        WsClient::connect_ready(&url, &fleet.token("bob", json!({"roles":["premium"]})), &[]).await?;
    // Claims and public lists need no application.
    plain.ok(json!({"op":"join","room":"desk:fx"}), 1).await?;
    plain.ok(json!({"op":"join","room":"lobby"}), 2).await?;
    plain.ok(json!({"op":"join","room":"public:news"}), 3).await?;
    plain.ok(json!({"op":"subscribe","sub":"t","type":"tick"}), 4).await?;
    plain
        .ok(json!({"op":"subscribe","sub":"m","type":"market_depth"}), 5)
        .await?;
    // No application answering: denied (after the timeout), never allowed.
    let r = plain.request(json!({"op":"join","room":"vip"}), 6).await?;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = plain
        .request(json!({"op":"subscribe","sub":"a","type":"alerts"}), 7)
        .await?;
    assert_eq!(r["code"], "forbidden", "{r}");

    // The application decides by role.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked = || seen.load(std::sync::atomic::Ordering::SeqCst);
    let responder = authz_responder(fleet.producer.clone(), "sy.authz.>", seen.clone()).await?;
    let r = plain
        .request(json!({"op":"subscribe","sub":"a","type":"alerts"}), 8)
        .await?;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(
        r["message"].as_str().unwrap_or_default().contains("premium only"),
        "{r}"
    );
    premium
        .ok(json!({"op":"subscribe","sub":"a","type":"alerts"}), 1)
        .await?;
    premium.ok(json!({"op":"join","room":"vip"}), 2).await?;
    let r = plain.request(json!({"op":"join","room":"vip"}), 9).await?;
    assert_eq!(r["code"], "forbidden", "{r}");
    // Decisions are cached: the same question again does not reach the application.
    let before = asked();
    assert!(before >= 4, "the application was asked {before} times");
    premium
        .ok(json!({"op":"subscribe","sub":"a2","type":"alerts"}), 3)
        .await?;
    assert_eq!(asked(), before, "a cached decision was asked again");
    responder.abort();

    // Limits from config use invalid_filter.
    let r = plain
        .request(
            json!({"op":"subscribe","sub":"d","type":"tick","filters":{"a":["1"],"b":["1"],"c":["1"]}}),
            10,
        )
        .await?;
    assert_eq!(r["code"], "invalid_filter", "{r}");
    let r = plain
        .request(
            json!({"op":"subscribe","sub":"d","type":"tick","filters":{"a":["1","2","3","4"]}}),
            11,
        )
        .await?;
    assert_eq!(r["code"], "invalid_filter", "{r}");

    // What was allowed works end to end.
    fleet
        .publish("alerts", &json!({"data":"for premium","target":{"match":{}}}))
        .await?;
    let ev = premium.take_events(1).await?.remove(0);
    assert_eq!(ev["data"], "for premium");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_application_that_answers_too_late_is_a_denial() -> R {
    let fleet = Fleet::start_custom(
        |r| {
            r.public_types = vec![];
            r.authz_request = true;
            r.authz_timeout = Duration::from_millis(200);
        },
        |_| {},
    )
    .await?;
    // A responder that answers "allow" after 1 s, too late.
    let client = fleet.producer.clone();
    let mut sub = client.subscribe("sy.authz.subscribe").await?;
    client.flush().await?;
    let slow = tokio::spawn(async move {
        if let Some(msg) = sub.next().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &rmpv::Value::Map(vec![("allow".into(), true.into())])).unwrap();
            if let Some(to) = msg.reply {
                let _ = client.publish(to, buf.into()).await;
            }
        }
    });
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    let r = c
        .request(json!({"op":"subscribe","sub":"a","type":"alerts"}), 1)
        .await?;
    assert_eq!(r["code"], "forbidden", "{r}");
    slow.await?;
    // The late "allow" was not cached as a decision either.
    assert_eq!(c.request(json!({"op":"list"}), 2).await?["subs"], json!([]));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn thousands_of_durable_deliveries_in_one_batch_are_all_stored() -> R {
    // More durable deliveries per batch than the JetStream context's default
    // window of unacknowledged publishes (5000): the router must keep its
    // own bound instead of waiting on itself.
    const USERS: usize = 60;
    const EVENTS: usize = 150;
    let fleet = Fleet::start().await?;
    for u in 0..USERS {
        let req = switchyard_common::control::ControlRequest {
            user: format!("u{u}"),
            rooms: vec![],
            roles: vec![],
            op: switchyard_common::control::ControlOp::Subscribe(switchyard_common::subscription::RawSubscription {
                sub: "all".into(),
                sub_type: "wide".into(),
                filters: None,
                min: None,
                max: None,
                fields: None,
                throttle_ms: None,
                snapshot: None,
            }),
        };
        let reply = fleet
            .producer
            .request("sy.control", switchyard_common::control::encode(&req).into())
            .await?;
        let reply: switchyard_common::control::ControlReply = switchyard_common::control::decode(&reply.payload)?;
        assert_eq!(reply, switchyard_common::control::ControlReply::Ok);
    }
    for i in 0..EVENTS {
        let mut payload = Vec::new();
        switchyard_common::transcode::json_to_msgpack(&json!({"data": i, "target": {"match": {}}}), &mut payload);
        fleet.producer.publish("sy.events.wide", payload.into()).await?;
    }
    fleet.producer.flush().await?;
    fleet.settle().await?;
    let js = async_nats::jetstream::new(fleet.producer.clone());
    let stored = switchyard_tests::fleet::stored_deliveries(&js).await?;
    assert_eq!(stored, (USERS * EVENTS) as u64);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn jetstream_publishes_are_acknowledged_stored_once_per_msg_id_and_delivered() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    let js = async_nats::jetstream::new(fleet.producer.clone());
    let mut payload = Vec::new();
    switchyard_common::transcode::json_to_msgpack(&json!({"data":"acked","target":{"users":["alice"]}}), &mut payload);
    // The same JetStream message id twice: the stream stores it once.
    for _ in 0..2 {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.clone().into())
            .message_id("producer-msg-1");
        let ack = js.send_publish("sy.events.orders.o1", publish).await?.await?;
        assert_eq!(ack.stream, "SY_EVENTS_KEYED");
    }
    // A deeper subject than any valid shape is not taken in: no responders.
    let deep = js.publish("sy.events.orders.o1.extra", payload.clone().into()).await;
    let refused = match deep {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(refused, "a subject outside the event shapes was acknowledged");
    fleet.settle().await?;
    fleet
        .publish("direct", &json!({"data":"end","target":{"users":["alice"]}}))
        .await?;
    let evs = c.events_until(|e| e["data"] == "end").await?;
    let data: Vec<&str> = evs.iter().map(|e| e["data"].as_str().unwrap_or_default()).collect();
    assert_eq!(data, ["acked", "end"]);
    fleet.shutdown().await;
    Ok(())
}
