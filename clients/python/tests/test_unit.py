"""Pure tests: envelopes, targets, validation, request building and reply decoding. No NATS."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgpack
import pytest

from switchyard import (
    ApiError,
    BadRequest,
    InternalError,
    InvalidFilter,
    RpcError,
    TooManyRooms,
    Unavailable,
    ValidationError,
    to_all,
    to_match,
    to_room,
    to_users,
)
from switchyard import api
from switchyard._codec import decode_map, encode, is_json
from switchyard.events import build_event, event_subject
from switchyard.handlers import JoinRequest, SubscribeRequest, authz_reply, parse_authz, parse_rpc, rpc_error_from, rpc_result


def unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False)


# ------------------------------------------------------------------ targets


def test_targets_build_the_wire_maps() -> None:
    assert to_users(["alice", "b-2"]).to_wire() == {"users": ["alice", "b-2"]}
    assert to_room("desk:fx").to_wire() == {"room": "desk:fx"}
    assert to_all().to_wire() == {"all": True}
    assert to_match({"symbol": "AAPL"}).to_wire() == {"match": {"symbol": "AAPL"}}
    assert to_match({"symbol": "AAPL", "tier": "daily"}, values={"confidence": 0.8}, type="tier_patterns").to_wire() == {
        "match": {"symbol": "AAPL", "tier": "daily"},
        "values": {"confidence": 0.8},
        "type": "tier_patterns",
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: to_users([]),
        lambda: to_users("alice"),
        lambda: to_users(["a.b"]),
        lambda: to_users(["_x"]),
        lambda: to_users(["a" * 65]),
        lambda: to_room("a room"),
        lambda: to_room(""),
        lambda: to_room("r" * 129),
        lambda: to_match({"Symbol": "AAPL"}),
        lambda: to_match({"symbol": "x" * 65}),
        lambda: to_match({"symbol": 7}),  # type: ignore[dict-item]
        lambda: to_match({"symbol": "A"}, values={"c": "high"}),  # type: ignore[dict-item]
        lambda: to_match({"symbol": "A"}, values={"c": float("nan")}),
        lambda: to_match({"symbol": "A"}, values={"c": True}),
        lambda: to_match({"symbol": "A"}, type="Bad"),
    ],
)
def test_bad_targets_are_refused(make: Any) -> None:
    with pytest.raises(ValidationError):
        make()


def test_users_limit() -> None:
    assert len(to_users([f"u{i}" for i in range(10_000)]).to_wire()["users"]) == 10_000
    with pytest.raises(ValidationError, match="10000"):
        to_users([f"u{i}" for i in range(10_001)])


def test_match_value_limit_counts_bytes() -> None:
    to_match({"symbol": "é" * 32})  # 64 bytes
    with pytest.raises(ValidationError):
        to_match({"symbol": "é" * 33})


# ------------------------------------------------------------------ envelopes


def test_minimal_event() -> None:
    ev = build_event("sy", "pattern", {"x": 1}, target=to_users(["alice"]))
    assert ev.subject == "sy.events.pattern"
    assert ev.headers is None
    assert ev.msg_id is None
    assert unpack(ev.payload) == {"data": {"x": 1}, "target": {"users": ["alice"]}}


def test_every_field() -> None:
    ev = build_event(
        "acme.sy",
        "tick",
        {"price": 1.5, "raw": b"\x00\x01"},
        target=to_match({"symbol": "AAPL"}),
        key="AAPL",
        id="run-1",
        prio="critical",
        durable=False,
    )
    assert ev.subject == "acme.sy.events.tick.AAPL"
    assert ev.msg_id == "run-1"
    body = unpack(ev.payload)
    assert body == {
        "data": {"price": 1.5, "raw": b"\x00\x01"},
        "target": {"match": {"symbol": "AAPL"}},
        "id": "run-1",
        "prio": "critical",
        "durable": False,
    }
    assert "key" not in body, "a subject-token key travels in the subject"


def test_normal_priority_and_durable_are_defaults_left_out() -> None:
    body = unpack(build_event("sy", "t", 1, target=to_all(), prio="normal", durable=True).payload)
    assert body == {"data": 1, "target": {"all": True}}


def test_integer_id() -> None:
    ev = build_event("sy", "t", None, target=to_all(), id=42)
    assert unpack(ev.payload)["id"] == 42
    assert ev.msg_id == "42"


def test_key_that_is_not_a_subject_token_goes_in_the_payload() -> None:
    for key in ("a.b", "with space", "x*", ">", "tab\there"):
        ev = build_event("sy", "tick", 1, target=to_all(), key=key)
        assert ev.subject == "sy.events.tick", key
        assert unpack(ev.payload)["key"] == key


def test_json_encoding() -> None:
    ev = build_event("sy", "news", {"title": "héllo", "n": 3}, target=to_room("lobby"), encoding="json")
    assert ev.headers == {"Content-Type": "application/json"}
    assert json.loads(ev.payload) == {"data": {"title": "héllo", "n": 3}, "target": {"room": "lobby"}}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": "Tick"},
        {"type": "1tick"},
        {"type": "t" * 33},
        {"type": "a.b"},
        {"key": ""},
        {"key": "k" * 257},
        {"id": ""},
        {"id": "i" * 257},
        {"id": 1.5},
        {"id": True},
        {"id": 2**64},
        {"prio": "urgent"},
        {"durable": "no"},
        {"encoding": "xml"},
        {"target": {"all": True}},
        {"data": float("nan"), "encoding": "json"},
        {"data": b"bytes", "encoding": "json"},
        {"data": object()},
    ],
)
def test_bad_events_are_refused(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"type": "tick", "data": {"a": 1}, "target": to_all()}
    args.update(kwargs)
    ty, data = args.pop("type"), args.pop("data")
    with pytest.raises(ValidationError):
        build_event("sy", ty, data, **args)


def test_event_subject() -> None:
    assert event_subject("sy", "tick") == "sy.events.tick"
    assert event_subject("sy", "tick", "AAPL") == "sy.events.tick.AAPL"
    with pytest.raises(ValidationError):
        event_subject("sy", "tick", "a.b")


# ------------------------------------------------------------------ application API requests


def test_api_requests() -> None:
    assert api.disconnect_request("alice") == {"user": "alice"}
    assert api.disconnect_request("alice", True, "maintenance") == {"user": "alice", "reconnect": True, "reason": "maintenance"}
    assert api.revoke_user_request("alice", 1700000000) == {"user": "alice", "before": 1700000000}
    assert api.revoke_user_request("alice", 1700000000.2) == {"user": "alice", "before": 1700000001}
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    assert api.revoke_token_request("j-1", when) == {"jti": "j-1", "until": 1704067200}
    assert api.subscribe_request("alice", "s1", "tick") == {"user": "alice", "sub": "s1", "type": "tick"}
    assert api.subscribe_request(
        "alice",
        "s1",
        "tier_patterns",
        filters={"symbol": ("AAPL", "TSLA")},
        min={"confidence": 0.6},
        max={"confidence": 1},
        fields=["price"],
        snapshot=True,
        throttle_ms=250,
    ) == {
        "user": "alice",
        "sub": "s1",
        "type": "tier_patterns",
        "filters": {"symbol": ["AAPL", "TSLA"]},
        "min": {"confidence": 0.6},
        "max": {"confidence": 1},
        "fields": ["price"],
        "snapshot": True,
        "throttle_ms": 250,
    }
    assert api.user_sub_request("alice", "s1") == {"user": "alice", "sub": "s1"}
    assert api.user_room_request("alice", "desk:fx") == {"user": "alice", "room": "desk:fx"}
    assert api.presence_request(["a", "b"]) == {"users": ["a", "b"]}
    assert api.room_presence_request("lobby") == {"room": "lobby"}
    assert api.room_presence_request("lobby", 5) == {"room": "lobby", "limit": 5}


@pytest.mark.parametrize(
    "make",
    [
        lambda: api.disconnect_request("a b"),
        lambda: api.disconnect_request("alice", reason="r" * 129),
        lambda: api.disconnect_request("alice", reconnect=1),  # type: ignore[arg-type]
        lambda: api.revoke_user_request("alice", -1),
        lambda: api.revoke_user_request("alice", "yesterday"),
        lambda: api.revoke_user_request("alice", dt.datetime(2024, 1, 1)),
        lambda: api.revoke_token_request("", 1),
        lambda: api.revoke_token_request("j" * 129, 1),
        lambda: api.subscribe_request("alice", "bad name", "tick"),
        lambda: api.subscribe_request("alice", "s", "Tick"),
        lambda: api.subscribe_request("alice", "s", "tick", filters={"symbol": []}),
        lambda: api.subscribe_request("alice", "s", "tick", filters={"symbol": "AAPL"}),
        lambda: api.subscribe_request("alice", "s", "tick", min={"c": "high"}),  # type: ignore[dict-item]
        lambda: api.subscribe_request("alice", "s", "tick", fields=[]),
        lambda: api.subscribe_request("alice", "s", "tick", snapshot=1),  # type: ignore[arg-type]
        lambda: api.subscribe_request("alice", "s", "tick", throttle_ms=0),
        lambda: api.subscribe_request("alice", "s", "tick", throttle_ms=3_600_001),
        lambda: api.user_room_request("alice", "no spaces"),
        lambda: api.presence_request("alice"),
        lambda: api.presence_request([f"u{i}" for i in range(1001)]),
        lambda: api.room_presence_request("lobby", 0),
        lambda: api.room_presence_request("lobby", 10_001),
    ],
)
def test_bad_api_requests_are_refused(make: Any) -> None:
    with pytest.raises(ValidationError):
        make()


# ------------------------------------------------------------------ application API replies


def test_error_replies_raise_typed_errors() -> None:
    cases: list[tuple[str, type[ApiError]]] = [
        ("bad_request", BadRequest),
        ("unavailable", Unavailable),
        ("internal", InternalError),
        ("invalid_filter", InvalidFilter),
        ("too_many_rooms", TooManyRooms),
        ("something_new", ApiError),
    ]
    for code, cls in cases:
        with pytest.raises(cls) as info:
            api.unwrap_reply({"error": {"code": code, "message": "why"}})
        assert type(info.value) is cls
        assert info.value.code == code
        assert info.value.message == "why"
        assert info.value.retryable == (code == "unavailable")


@pytest.mark.parametrize("reply", [{}, {"result": 3}, {"error": "x"}, {"error": {"message": "no code"}}])
def test_malformed_replies_are_internal(reply: dict[str, Any]) -> None:
    with pytest.raises(InternalError):
        api.unwrap_reply(reply)


def test_results_are_typed() -> None:
    assert api.connections_from(api.unwrap_reply({"result": {"connections": 2}})) == 2
    listing = api.listing_from(
        {
            "subs": [
                {"sub": "s1", "type": "tick", "filters": {"symbol": ["AAPL"]}, "min": {}, "max": {"c": 1}},
                {"sub": "s2", "type": "news", "filters": {}, "min": {}, "max": {}, "fields": ["title"], "throttle_ms": 5},
            ],
            "rooms": ["lobby"],
        }
    )
    assert listing.rooms == ["lobby"]
    assert [s.sub for s in listing.subs] == ["s1", "s2"]
    assert listing.subs[0].filters == {"symbol": ["AAPL"]}
    assert listing.subs[0].max == {"c": 1.0}
    assert listing.subs[0].fields is None
    assert listing.subs[1].fields == ["title"]
    assert listing.subs[1].extra == {"throttle_ms": 5}
    assert api.presence_from({"users": {"alice": {"connections": 2}}}) == {"alice": 2}
    rp = api.room_presence_from({"members": 3, "online": ["a"], "truncated": True})
    assert (rp.members, rp.online, rp.truncated) == (3, ["a"], True)
    st = api.stats_from({"edges": 1, "routers": 1, "connections": 4, "users": 3, "subscriptions": 2, "rooms": 1})
    assert (st.edges, st.routers, st.connections, st.users, st.subscriptions, st.rooms) == (1, 1, 4, 3, 2, 1)
    ev = api.presence_event_from("online", {"user": "alice", "ts": 1700000000000})
    assert (ev.user, ev.online, ev.ts) == ("alice", True, 1700000000000)
    assert not api.presence_event_from("offline", {"user": "alice", "ts": 1}).online


@pytest.mark.parametrize(
    "read",
    [
        lambda: api.stats_from({"edges": 1}),
        lambda: api.connections_from({"connections": "2"}),
        lambda: api.room_presence_from({"members": 1, "online": [], "truncated": "no"}),
        lambda: api.presence_from({"users": {"a": 2}}),
        lambda: api.listing_from({"subs": [{"sub": "s"}], "rooms": []}),
    ],
)
def test_malformed_results_are_internal(read: Any) -> None:
    with pytest.raises(InternalError):
        read()


# ------------------------------------------------------------------ rpc and authorization payloads


def test_rpc_request_and_replies() -> None:
    req = parse_rpc("orders.place", encode({"user": "alice", "roles": ["trader"], "data": {"qty": 3}}))
    assert (req.method, req.user, req.roles, req.data) == ("orders.place", "alice", ["trader"], {"qty": 3})
    assert unpack(rpc_result({"ok": True})) == {"data": {"ok": True}}
    assert unpack(rpc_result(None)) == {"data": None}
    assert unpack(rpc_error_from(RpcError("out_of_stock", "none left"))) == {
        "error": {"code": "out_of_stock", "message": "none left"}
    }
    with pytest.raises(ValidationError):
        RpcError("")


def test_authz_requests_and_replies() -> None:
    join = parse_authz("join", encode({"kind": "join", "user": "bob", "roles": [], "rooms": ["a:*"], "room": "vip"}))
    assert join == JoinRequest(user="bob", roles=[], rooms=["a:*"], room="vip")
    sub = parse_authz(
        "subscribe",
        encode({"kind": "subscribe", "user": "bob", "roles": ["r"], "rooms": [], "type": "depth", "filters": {"s": ["A"]}}),
    )
    assert sub == SubscribeRequest(user="bob", roles=["r"], rooms=[], type="depth", filters={"s": ["A"]})
    assert unpack(authz_reply(True)) == {"allow": True}
    assert unpack(authz_reply(False)) == {"allow": False}
    assert unpack(authz_reply((False, "premium only"))) == {"allow": False, "message": "premium only"}
    assert unpack(authz_reply((True, "ignored"))) == {"allow": True}
    for bad in (None, 1, "yes", (True,), (1, "x")):
        with pytest.raises(TypeError):
            authz_reply(bad)


def test_codec() -> None:
    assert is_json({"Content-Type": "application/json; charset=utf-8"})
    assert is_json({"content-type": "Application/JSON"})
    assert not is_json({"Content-Type": "application/msgpack"})
    assert not is_json(None)
    assert decode_map(encode({"a": 1}, "json"), "json") == {"a": 1}
    with pytest.raises(ValueError):
        decode_map(encode([1, 2]))
    with pytest.raises(ValueError):
        decode_map(b"\xc1")
