"""The application API (protocol 1.1, section 3) against a real fleet, one test per method.

Skipped while the binaries do not answer on ``sy.api.*`` (see conftest's
``api_sy``); SWITCHYARD_REQUIRE_API=1 turns that into a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from switchyard import BadRequest, InvalidFilter, PresenceEvent, Switchyard, ValidationError, to_match, to_room, to_users

from .fleet import WAIT, Fleet, WsClient, refused_status, unique

pytestmark = [pytest.mark.fleet, pytest.mark.api]

T = TypeVar("T")


async def eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str) -> T:
    """Polls ``read`` until ``ok`` holds (the API's counts are eventually consistent within 2 s)."""
    deadline = time.monotonic() + WAIT
    last: T | None = None
    while time.monotonic() < deadline:
        last = await read()
        if ok(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: still {last!r} after {WAIT} s")


async def test_disconnect_closes_every_connection_with_4003(fleet: Fleet, api_sy: Switchyard) -> None:
    user = unique("dc")
    a, b = await fleet.client(user), await fleet.client(user)
    bystander = await fleet.client(unique("other"))
    try:
        assert await api_sy.disconnect(user, reason="maintenance") == 2
        assert await a.closed() == 4003
        assert await b.closed() == 4003
        assert not [f for f in a.frames + b.frames if f["op"] == "reconnect"], "reconnect sent without reconnect=True"
        # Nobody else is touched.
        assert (await bystander.request("ping"))["op"] == "pong"
        assert await api_sy.disconnect(user) == 0, "nothing left to close"
    finally:
        await bystander.close()


async def test_disconnect_with_reconnect_sends_reconnect_first(fleet: Fleet, api_sy: Switchyard) -> None:
    user = unique("dcr")
    c = await fleet.client(user)
    assert await api_sy.disconnect(user, reconnect=True, reason="moving you") == 1
    frame = await c.wait(lambda f: f["op"] == "reconnect", what="reconnect frame")
    assert frame["after_ms"] == 0
    assert await c.closed() == 4003


async def test_revoke_user_refuses_older_tokens(fleet: Fleet, api_sy: Switchyard) -> None:
    user = unique("rv")
    now = int(time.time())
    old_token = fleet.token(user, iat=now - 100)
    live = await WsClient.open(fleet.ws_url, old_token)
    await api_sy.revoke_user(user, before=now - 10)
    # A new connection with a token issued before `before` is refused with 401 ...
    assert await refused_status(fleet.ws_url, fleet.token(user, iat=now - 50)) == 401
    # ... the live one is closed with 4001 (the protocol says within 2 s) ...
    assert await live.closed(timeout=WAIT) == 4001
    # ... and a token issued after `before` still works.
    fresh = await WsClient.open(fleet.ws_url, fleet.token(user, iat=now))
    await fresh.close()
    # Another user's old token is not affected.
    other = await WsClient.open(fleet.ws_url, fleet.token(unique("rv"), iat=now - 100))
    await other.close()


async def test_revoke_token_by_jti(fleet: Fleet, api_sy: Switchyard) -> None:
    user, jti = unique("jti"), unique("token")
    now = int(time.time())
    token = fleet.token(user, jti=jti)
    live = await WsClient.open(fleet.ws_url, token)
    await api_sy.revoke_token(jti, until=now + 3600)
    assert await live.closed(timeout=WAIT) == 4001
    assert await refused_status(fleet.ws_url, token) == 401
    # The same user with another token is fine.
    other = await WsClient.open(fleet.ws_url, fleet.token(user, jti=unique("token")))
    await other.close()


async def test_subscribe_for_an_online_user(fleet: Fleet, api_sy: Switchyard) -> None:
    user, symbol = unique("sub"), unique("SYM")
    c = await fleet.client(user)
    try:
        await api_sy.subscribe(user, "watch", "tick", filters={"symbol": [symbol]}, min={"price": 10})
        await api_sy.publish("tick", {"price": 5}, target=to_match({"symbol": symbol}, values={"price": 5}))
        await api_sy.publish("tick", {"price": 50}, target=to_match({"symbol": symbol}, values={"price": 50}))
        ev = await c.event()
        assert ev["data"] == {"price": 50}, "the bound min.price=10 did not hold"
        assert ev["sub"] == ["watch"]
    finally:
        await c.close()


async def test_subscribe_and_join_for_an_offline_user(fleet: Fleet, api_sy: Switchyard) -> None:
    user, symbol, room = unique("off"), unique("SYM"), unique("room")
    await api_sy.subscribe(user, "later", "pattern", filters={"symbol": [symbol]}, fields=["price"])
    await api_sy.join(user, room)
    listing = await api_sy.list(user)
    assert [(s.sub, s.type, s.filters, s.fields) for s in listing.subs] == [("later", "pattern", {"symbol": [symbol]}, ["price"])]
    assert listing.rooms == [room]
    # A durable event while the user is away waits in the offline queue.
    await api_sy.publish("pattern", {"price": 1, "secret": 2}, target=to_match({"symbol": symbol}))
    await api_sy.publish("news", {"n": 1}, target=to_room(room))
    c = await fleet.client(user, query="?epoch=new&since=0")
    try:
        got = [await c.event(), await c.event()]
        by_type = {e["type"]: e for e in got}
        assert by_type["pattern"]["data"] == {"price": 1}, "fields=['price'] not applied"
        assert by_type["pattern"]["sub"] == ["later"]
        assert by_type["news"]["data"] == {"n": 1}
        await c.wait(lambda f: f["op"] == "resumed", what="resumed")
        subs = await c.request("list")
        assert [s["sub"] for s in subs["subs"]] == ["later"]
    finally:
        await c.close()


async def test_unsubscribe(fleet: Fleet, api_sy: Switchyard) -> None:
    user, gone, kept = unique("unsub"), unique("A"), unique("B")
    c = await fleet.client(user)
    try:
        await api_sy.subscribe(user, "gone", "alert", filters={"symbol": [gone]})
        await api_sy.subscribe(user, "kept", "alert", filters={"symbol": [kept]})
        await api_sy.unsubscribe(user, "gone")
        await api_sy.unsubscribe(user, "never-existed")  # idempotent
        assert [s.sub for s in (await api_sy.list(user)).subs] == ["kept"]
        # Same subject, so in order: had "gone" survived, its event would come first.
        await api_sy.publish("alert", {"which": "gone"}, target=to_match({"symbol": gone}))
        await api_sy.publish("alert", {"which": "kept"}, target=to_match({"symbol": kept}))
        ev = await c.event()
        assert ev["data"] == {"which": "kept"}, f"an event for the removed subscription arrived: {ev}"
    finally:
        await c.close()


async def test_join_and_leave(fleet: Fleet, api_sy: Switchyard) -> None:
    user, room = unique("jl"), unique("desk")
    c = await fleet.client(user)  # no rooms claim: the application is trusted
    try:
        await api_sy.join(user, room)
        await api_sy.join(user, room)  # idempotent
        assert (await api_sy.list(user)).rooms == [room]
        await api_sy.publish("note", {"n": 1}, target=to_room(room))
        assert (await c.event())["data"] == {"n": 1}
        await api_sy.leave(user, room)
        assert (await api_sy.list(user)).rooms == []
        await api_sy.publish("note", {"n": 2}, target=to_room(room))
        await api_sy.publish("note", {"n": 3}, target=to_users([user]))
        assert (await c.event())["data"] == {"n": 3}, "a room event arrived after leave"
    finally:
        await c.close()


async def test_list_shows_what_the_client_made(fleet: Fleet, api_sy: Switchyard) -> None:
    user, room = unique("ls"), unique("r")
    c = await fleet.client(user, rooms=[room])
    try:
        await c.ok("subscribe", sub="mine", type="tick", filters={"symbol": ["B", "A"]}, max={"price": 5})
        await c.ok("join", room=room)
        listing = await api_sy.list(user)
        assert len(listing.subs) == 1
        s = listing.subs[0]
        assert (s.sub, s.type, s.filters, s.min, s.max, s.fields) == ("mine", "tick", {"symbol": ["A", "B"]}, {}, {"price": 5.0}, None)
        assert listing.rooms == [room]
        empty = await api_sy.list(unique("nobody"))
        assert (empty.subs, empty.rooms) == ([], [])
    finally:
        await c.close()


async def test_presence_counts_connections(fleet: Fleet, api_sy: Switchyard) -> None:
    user, away = unique("pr"), unique("away")
    a, b = await fleet.client(user), await fleet.client(user)
    try:
        got = await eventually(lambda: api_sy.presence([user, away]), lambda p: p == {user: 2}, "presence")
        assert away not in got
    finally:
        await a.close()
    await eventually(lambda: api_sy.presence([user]), lambda p: p == {user: 1}, "presence after one closed")
    await b.close()
    await eventually(lambda: api_sy.presence([user]), lambda p: p == {}, "presence after both closed")


async def test_room_presence(fleet: Fleet, api_sy: Switchyard) -> None:
    room = unique("rp")
    on1, on2, off = unique("on"), unique("on"), unique("off")
    for u in (on1, on2, off):
        await api_sy.join(u, room)
    a, b = await fleet.client(on1), await fleet.client(on2)
    try:
        rp = await eventually(
            lambda: api_sy.room_presence(room), lambda r: sorted(r.online) == sorted([on1, on2]), "room presence"
        )
        assert (rp.members, rp.truncated) == (3, False)
        one = await api_sy.room_presence(room, limit=1)
        assert one.members == 3 and one.truncated is True and len(one.online) == 1 and one.online[0] in (on1, on2)
        two = await api_sy.room_presence(room, limit=2)
        assert two.truncated is False and sorted(two.online) == sorted([on1, on2])
    finally:
        await a.close()
        await b.close()
    empty = await api_sy.room_presence(unique("empty"))
    assert (empty.members, empty.online, empty.truncated) == (0, [], False)


async def test_stats(fleet: Fleet, api_sy: Switchyard) -> None:
    users = [unique("st"), unique("st")]
    clients = [await fleet.client(users[0]), await fleet.client(users[0]), await fleet.client(users[1])]
    try:
        await api_sy.subscribe(users[0], "s", "tick")
        await api_sy.join(users[1], unique("room"))
        st = await eventually(api_sy.stats, lambda s: s.connections >= 3 and s.users >= 2, "stats")
        assert st.edges == 1 and st.routers == 1
        assert st.subscriptions >= 1 and st.rooms >= 1
    finally:
        for c in clients:
            await c.close()


async def test_presence_events(fleet: Fleet, api_sy: Switchyard) -> None:
    user = unique("pe")
    async with api_sy.presence_events() as events:

        async def next_of_user() -> PresenceEvent:
            while True:
                ev = await events.next(timeout=WAIT)
                if ev.user == user:
                    return ev

        before = int(time.time() * 1000)
        c = await fleet.client(user)
        online = await next_of_user()
        assert online.online is True and online.ts >= before - 5000
        await c.close()
        offline = await next_of_user()
        assert offline.online is False and offline.ts >= online.ts


async def test_api_errors(fleet: Fleet, api_sy: Switchyard) -> None:
    # What the client-side checks let through but the server refuses.
    with pytest.raises(InvalidFilter):
        await api_sy.subscribe(unique("e"), "s", "tick", filters={f"d{i}": ["v"] for i in range(33)})
    # Requests the SDK would refuse, sent raw to check the server's answer.
    with pytest.raises(BadRequest):
        await api_sy._api("disconnect", {"user": "not valid"}, None)
    with pytest.raises(BadRequest):
        await api_sy._api("revoke", {"user": "a", "jti": "b"}, None)
    with pytest.raises(ValidationError):
        await api_sy.disconnect("not valid")


async def test_json_api(fleet: Fleet, api_sy: Switchyard) -> None:
    js = Switchyard(api_sy.nc, api_encoding="json")
    user = unique("json")
    await js.subscribe(user, "s", "tick", filters={"symbol": ["A"]})
    assert [s.sub for s in (await js.list(user)).subs] == ["s"]
    assert (await js.stats()).routers >= 1
    with pytest.raises(BadRequest):
        await js._api("join", {"user": user}, None)
