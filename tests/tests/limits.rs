//! Limits on what one user can make the fleet do or hold: the op rate limit
//! per connection, the subscription and room caps (exact across routers),
//! and the bounds on the subscription bucket (no writes for absent names,
//! tombstones that expire, `max_bytes`).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use serde_json::{json, Value};
use switchyard_common::subject::Subjects;
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::WsClient;

type R = anyhow::Result<()>;

/// The subscription bucket's stream.
async fn subs_stream(fleet: &Fleet) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let js = async_nats::jetstream::new(fleet.producer.clone());
    Ok(js
        .get_stream(format!("KV_{}", Subjects::default().store_bucket()))
        .await?)
}

/// The bucket's last sequence (its last revision).
async fn last_revision(fleet: &Fleet) -> anyhow::Result<u64> {
    Ok(subs_stream(fleet).await?.info().await?.state.last_sequence)
}

/// Replies to requests sent back to back, by id.
async fn replies(c: &mut WsClient, n: usize) -> anyhow::Result<HashMap<u64, Value>> {
    let mut out = HashMap::new();
    while out.len() < n {
        let f = c
            .frame()
            .await
            .with_context(|| format!("after {} of {n} replies", out.len()))?;
        let id = f["id"].as_u64().with_context(|| format!("a reply without id: {f}"))?;
        if out.insert(id, f).is_some() {
            bail!("two replies to {id}");
        }
    }
    Ok(out)
}

#[tokio::test]
async fn quick_ops_past_the_burst_are_rate_limited_and_the_connection_stays_open() -> R {
    // A budget of 2 bad frames: if `rate_limited` counted as one, the many
    // below would close the connection.
    let fleet = Fleet::start_with(|e| {
        e.ops_per_s = 1;
        e.ops_burst = 10;
        e.bad_frame_budget = 2;
    })
    .await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    for id in 1..=60u32 {
        c.send(&json!({"op":"list","id":id})).await?;
    }
    let got = replies(&mut c, 60).await?;
    let limited = got.values().filter(|f| f["code"] == "rate_limited").count();
    let answered = got.values().filter(|f| f["op"] == "subs").count();
    assert_eq!(limited + answered, 60, "only subs or rate_limited: {got:?}");
    // A burst of 10 plus 1 per second: 50 cut unless the lists took 40 s.
    assert!(limited > 2, "{limited} of 60 rate limited");
    assert!(answered >= 10, "the burst was not granted: {answered}");
    for f in got.values().filter(|f| f["op"] == "error") {
        assert_eq!(f["op"], "error");
        assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
    }
    // Still open; ping is never limited.
    let pong = c.request(json!({"op":"ping"}), 100).await?;
    assert_eq!(pong["op"], "pong", "{pong}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_frames_spend_no_op_tokens() -> R {
    let fleet = Fleet::start_with(|e| {
        e.ops_per_s = 1;
        e.ops_burst = 3;
    })
    .await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), &[]).await?;
    for id in 1..=5u32 {
        c.send(&json!({"op":"no_such_op","id":id})).await?;
    }
    for id in 6..=8u32 {
        c.send(&json!({"op":"list","id":id})).await?;
    }
    let got = replies(&mut c, 8).await?;
    for id in 1..=5 {
        assert_eq!(got[&id]["code"], "bad_frame", "{}", got[&id]);
    }
    for id in 6..=8 {
        assert_eq!(got[&id]["op"], "subs", "a list after bad frames: {}", got[&id]);
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_additions_over_two_routers_never_pass_the_caps() -> R {
    const CAP: usize = 5;
    const CONNECTIONS: usize = 8;
    const EACH: usize = 4;
    let fleet = Fleet::start_custom(
        |r| {
            r.max_subscriptions = CAP;
            r.max_rooms_per_user = CAP;
        },
        |_| {},
    )
    .await?;
    let second = fleet
        .start_router(|r| {
            r.max_subscriptions = CAP;
            r.max_rooms_per_user = CAP;
        })
        .await?;
    let token = fleet.token("alice", json!({"rooms":["room:*"]}));
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(WsClient::connect_ready(&fleet.ws_url(), &token, &[]).await?.0);
    }
    // Every connection asks for its own names at once; the control requests
    // spread over both routers.
    let runs = clients.into_iter().enumerate().map(|(i, mut c)| async move {
        let mut codes = Vec::new();
        for j in 0..EACH {
            let id = (j * 2) as u32;
            let sub = json!({"op":"subscribe","sub":format!("s{i}-{j}"),"type":"tick"});
            let r = c.request(sub, id + 1).await?;
            codes.push(("subscribe", r["code"].as_str().unwrap_or("ok").to_string()));
            let r = c
                .request(json!({"op":"join","room":format!("room:{i}-{j}")}), id + 2)
                .await?;
            codes.push(("join", r["code"].as_str().unwrap_or("ok").to_string()));
        }
        anyhow::Ok((c, codes))
    });
    let mut done = Vec::new();
    for r in futures::future::join_all(runs).await {
        done.push(r?);
    }
    let count = |op: &str, code: &str| {
        done.iter()
            .flat_map(|(_, codes)| codes)
            .filter(|(o, c)| *o == op && c == code)
            .count()
    };
    assert_eq!(count("subscribe", "ok"), CAP, "subscriptions accepted");
    assert_eq!(count("subscribe", "too_many_subscriptions"), CONNECTIONS * EACH - CAP);
    assert_eq!(count("join", "ok"), CAP, "joins accepted");
    assert_eq!(count("join", "too_many_rooms"), CONNECTIONS * EACH - CAP);
    let (c, _) = &mut done[0];
    let subs = c.request(json!({"op":"list"}), 1000).await?;
    assert_eq!(subs["subs"].as_array().map(Vec::len), Some(CAP), "{subs}");
    // Both routers hold exactly what was accepted (each has applied it: the
    // list above caught one up, and the other answered some `ok`s after that).
    fleet.settle().await?;
    let router = fleet.router.as_ref().context("router")?;
    for state in [&router.state, &second.state] {
        assert!(state.list("alice").len() <= CAP);
    }
    second.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn removals_of_absent_names_write_nothing() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) =
        WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({"rooms":["desk:*"]})), &[]).await?;
    let before = last_revision(&fleet).await?;
    c.ok(json!({"op":"unsubscribe","sub":"never-made"}), 1).await?;
    c.ok(json!({"op":"leave","room":"desk:never-joined"}), 2).await?;
    assert_eq!(last_revision(&fleet).await?, before, "a removal of nothing was written");
    // Real ones are written, once each; a second removal is of nothing again.
    c.ok(json!({"op":"subscribe","sub":"s","type":"tick"}), 3).await?;
    c.ok(json!({"op":"join","room":"desk:fx"}), 4).await?;
    // Joining a room the user is in writes nothing either.
    c.ok(json!({"op":"join","room":"desk:fx"}), 5).await?;
    c.ok(json!({"op":"unsubscribe","sub":"s"}), 6).await?;
    c.ok(json!({"op":"leave","room":"desk:fx"}), 7).await?;
    c.ok(json!({"op":"unsubscribe","sub":"s"}), 8).await?;
    c.ok(json!({"op":"leave","room":"desk:fx"}), 9).await?;
    assert_eq!(last_revision(&fleet).await?, before + 4);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn rooms_are_capped_per_user_and_rejoining_is_free() -> R {
    let fleet = Fleet::start_custom(|r| r.max_rooms_per_user = 3, |_| {}).await?;
    let (mut c, _) =
        WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({"rooms":["desk:*"]})), &[]).await?;
    for (i, room) in ["desk:a", "desk:b", "desk:c", "desk:a"].iter().enumerate() {
        c.ok(json!({"op":"join","room":room}), i as u32 + 1).await?;
    }
    let r = c.request(json!({"op":"join","room":"desk:d"}), 10).await?;
    assert_eq!(r["code"], "too_many_rooms", "{r}");
    assert!(r["message"].as_str().is_some_and(|m| m.contains('3')), "{r}");
    c.ok(json!({"op":"leave","room":"desk:b"}), 11).await?;
    c.ok(json!({"op":"join","room":"desk:d"}), 12).await?;
    // Another user has rooms of their own.
    let (mut bob, _) =
        WsClient::connect_ready(&fleet.ws_url(), &fleet.token("bob", json!({"rooms":["desk:*"]})), &[]).await?;
    bob.ok(json!({"op":"join","room":"desk:d"}), 1).await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tombstones_expire_and_routers_old_and_new_keep_serving() -> R {
    let mut fleet = Fleet::start_custom(
        |r| {
            r.subs_tombstone_ttl = std::time::Duration::from_secs(1);
            r.subs_max_bytes = 8 << 20;
        },
        |_| {},
    )
    .await?;
    let stream = subs_stream(&fleet).await?;
    let config = stream.cached_info().config.clone();
    assert_eq!(config.max_bytes, 8 << 20, "the bucket is bounded");
    assert!(config.allow_message_ttl);

    let url = fleet.ws_url();
    let (mut c, _) = WsClient::connect_ready(&url, &fleet.token("alice", json!({"rooms":["desk:*"]})), &[]).await?;
    c.ok(json!({"op":"subscribe","sub":"gone","type":"tick"}), 1).await?;
    c.ok(json!({"op":"join","room":"desk:gone"}), 2).await?;
    c.ok(json!({"op":"unsubscribe","sub":"gone"}), 3).await?;
    c.ok(json!({"op":"leave","room":"desk:gone"}), 4).await?;
    // The removal records go by themselves once their TTL has passed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = subs_stream(&fleet).await?.info().await?.state.clone();
        if info.messages == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} removal records still in the bucket after 30 s", info.messages);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subject = format!("$KV.{}.s.alice.gone", Subjects::default().store_bucket());
    match stream.get_last_raw_message_by_subject(&subject).await {
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
        other => bail!("the tombstone is still there: {other:?}"),
    }
    // The bucket's last sequence now names a message that is gone: the
    // router that applied it keeps serving...
    assert_eq!(c.request(json!({"op":"list"}), 5).await?["subs"], json!([]));
    // ...and so does one that starts after it went.
    fleet.router.take().context("router")?.shutdown().await;
    let router = fleet
        .start_router(|r| {
            r.subs_tombstone_ttl = std::time::Duration::from_secs(1);
            r.subs_max_bytes = 8 << 20;
        })
        .await?;
    assert_eq!(c.request(json!({"op":"list"}), 6).await?["subs"], json!([]));
    c.ok(json!({"op":"subscribe","sub":"new","type":"tick"}), 7).await?;
    c.ok(json!({"op":"join","room":"desk:new"}), 8).await?;
    assert_eq!(c.request(json!({"op":"list"}), 9).await?["subs"][0]["sub"], "new");
    router.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}
