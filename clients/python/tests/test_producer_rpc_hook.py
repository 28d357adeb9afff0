"""Publishing, rpc and the authorization hook against a real nats-server, router and edge."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from switchyard import (
    JoinRequest,
    RpcError,
    RpcRequest,
    SubscribeRequest,
    Switchyard,
    to_match,
    to_room,
    to_users,
)

from .fleet import Fleet, unique

pytestmark = pytest.mark.fleet


async def test_publish_msgpack_with_ack_reaches_a_subscriber(fleet: Fleet, sy: Switchyard) -> None:
    user, symbol = unique("pub"), unique("SYM")
    c = await fleet.client(user)
    try:
        await c.ok("subscribe", sub="ticks", type="tick", filters={"symbol": [symbol]})
        ack = await sy.publish(
            "tick",
            {"symbol": symbol, "price": 101.25, "raw": b"\x00\xff"},
            target=to_match({"symbol": symbol}, values={"price": 101.25}),
            key=symbol,
            prio="high",
        )
        assert ack is not None and ack.seq > 0 and ack.stream, ack
        ev = await c.event()
        assert ev["type"] == "tick"
        assert ev["data"] == {"symbol": symbol, "price": 101.25, "raw": b"\x00\xff"}
        assert ev["key"] == symbol
        assert ev["prio"] == "high"
        assert ev["sub"] == ["ticks"]
        assert isinstance(ev["pos"], int)
    finally:
        await c.close()


async def test_publish_json_with_ack_reaches_a_user(fleet: Fleet, sy: Switchyard) -> None:
    user = unique("json")
    c = await fleet.client(user)
    try:
        ack = await sy.publish(
            "note", {"text": "héllo", "n": 3, "f": 0.5}, target=to_users([user]), encoding="json", id=unique("id")
        )
        assert ack is not None and not ack.duplicate
        ev = await c.event()
        assert ev["type"] == "note"
        assert ev["data"] == {"text": "héllo", "n": 3, "f": 0.5}
        assert "sub" not in ev
    finally:
        await c.close()


async def test_publish_same_id_twice_is_stored_once(fleet: Fleet, sy: Switchyard) -> None:
    user, event_id = unique("dup"), unique("id")
    c = await fleet.client(user)
    try:
        first = await sy.publish("note", {"n": 1}, target=to_users([user]), id=event_id)
        again = await sy.publish("note", {"n": 1}, target=to_users([user]), id=event_id)
        assert first is not None and again is not None
        assert again.duplicate and again.seq == first.seq
        await sy.publish("note", {"n": 2}, target=to_users([user]))
        assert (await c.event())["data"] == {"n": 1}
        assert (await c.event())["data"] == {"n": 2}, "the repeated id was delivered twice"
    finally:
        await c.close()


async def test_plain_publish_live_only_to_a_room(fleet: Fleet, sy: Switchyard) -> None:
    user, room = unique("room"), unique("lobby")
    c = await fleet.client(user, rooms=[room])
    try:
        await c.ok("join", room=room)
        assert await sy.publish("news", {"headline": "up"}, target=to_room(room), durable=False, ack=False) is None
        await sy.flush()
        ev = await c.event()
        assert ev["type"] == "news" and ev["data"] == {"headline": "up"}
        assert "pos" not in ev, "a durable=False event has no pos"
    finally:
        await c.close()


async def test_rpc_round_trip_and_errors(fleet: Fleet, sy: Switchyard) -> None:
    seen: list[RpcRequest] = []

    @sy.rpc("orders.place")
    async def place(req: RpcRequest) -> object:
        seen.append(req)
        if req.data.get("symbol") == "NONE":
            raise RpcError("out_of_stock", "no more NONE")
        if req.data.get("symbol") == "BOOM":
            raise RuntimeError("a bug in the handler")
        return {"order": 17, "user": req.user, "qty": req.data["qty"]}

    @sy.rpc("ping_sync")
    def ping_sync(req: RpcRequest) -> str:
        return "pong"

    await sy.start()
    user = unique("rpc")
    c = await fleet.client(user, roles=["trader"])
    try:
        reply = await c.request("rpc", method="orders.place", data={"symbol": "AAPL", "qty": 3})
        assert reply["op"] == "rpc_result", reply
        assert reply["data"] == {"order": 17, "user": user, "qty": 3}
        assert seen[0].user == user and seen[0].roles == ["trader"] and seen[0].method == "orders.place"

        reply = await c.request("rpc", method="orders.place", data={"symbol": "NONE", "qty": 1})
        assert (reply["op"], reply["code"], reply["message"]) == ("error", "out_of_stock", "no more NONE")

        reply = await c.request("rpc", method="orders.place", data={"symbol": "BOOM", "qty": 1})
        assert (reply["op"], reply["code"]) == ("error", "internal")
        assert "bug" not in reply.get("message", ""), "exception text leaked to the client"

        reply = await c.request("rpc", method="ping_sync")
        assert (reply["op"], reply["data"]) == ("rpc_result", "pong")
    finally:
        await c.close()


async def test_rpc_replicas_share_the_work(fleet: Fleet, sy: Switchyard) -> None:
    other = await Switchyard.connect(fleet.nats_url)
    counts = {"a": 0, "b": 0}
    try:
        for name, client in (("a", sy), ("b", other)):

            def make(n: str) -> Callable[[RpcRequest], Awaitable[str]]:
                async def handler(req: RpcRequest) -> str:
                    counts[n] += 1
                    return n

                return handler

            client.rpc("shared.work")(make(name))
            await client.start()
        c = await fleet.client(unique("rpc"))
        try:
            for _ in range(20):
                reply = await c.request("rpc", method="shared.work")
                assert reply["op"] == "rpc_result", reply
        finally:
            await c.close()
        assert counts["a"] + counts["b"] == 20, f"a request was answered twice or not at all: {counts}"
        assert counts["a"] > 0 and counts["b"] > 0, f"one replica did all the work: {counts}"
    finally:
        await other.close()


async def test_join_hook_allows_and_denies(fleet: Fleet, sy: Switchyard) -> None:
    asked: list[JoinRequest] = []

    @sy.authorize_join
    async def may_join(req: JoinRequest) -> bool | tuple[bool, str]:
        asked.append(req)
        if "vip" in req.roles and req.room.startswith("vip-"):
            return True
        return False, "members only"

    await sy.start()
    vip, plain, room = unique("vip"), unique("plain"), unique("vip")
    a = await fleet.client(vip, roles=["vip"], rooms=["open:*"])
    b = await fleet.client(plain)
    try:
        await a.ok("join", room=room)
        denied = await b.request("join", room=room)
        assert (denied["op"], denied["code"], denied["message"]) == ("error", "forbidden", "members only")
        # The token's rooms claim decides without asking.
        await a.ok("join", room="open:1")
        assert [(r.user, r.room, r.roles, r.rooms) for r in asked] == [
            (vip, room, ["vip"], ["open:*"]),
            (plain, room, [], []),
        ]
        # A room event reaches the member the hook let in.
        await sy.publish("news", {"n": 1}, target=to_room(room))
        assert (await a.event())["data"] == {"n": 1}
    finally:
        await a.close()
        await b.close()


async def test_subscribe_hook_decides_on_type_and_filters(fleet: Fleet, sy: Switchyard) -> None:
    @sy.authorize("subscribe")
    def may_subscribe(req: SubscribeRequest) -> bool | tuple[bool, str]:
        if req.filters.get("symbol") == ["AAPL"]:
            return True
        return False, f"{req.type} needs a plan"

    await sy.start()
    c = await fleet.client(unique("sub"))
    try:
        await c.ok("subscribe", sub="p1", type="premium", filters={"symbol": ["AAPL"]})
        denied = await c.request("subscribe", sub="p2", type="premium", filters={"symbol": ["TSLA"]})
        assert (denied["op"], denied["code"], denied["message"]) == ("error", "forbidden", "premium needs a plan")
        await c.ok("subscribe", sub="t1", type="tick")  # a public type: not asked
    finally:
        await c.close()


async def test_a_failing_hook_denies(fleet: Fleet, sy: Switchyard) -> None:
    calls: list[JoinRequest] = []

    @sy.authorize_join
    async def broken(req: JoinRequest) -> bool:
        calls.append(req)
        raise RuntimeError("database down")

    await sy.start()
    c = await fleet.client(unique("hook"))
    try:
        reply = await c.request("join", room=unique("r"))
        assert (reply["op"], reply["code"]) == ("error", "forbidden")
        assert len(calls) == 1, "the hook was asked (and failed), not skipped"
    finally:
        await c.close()
