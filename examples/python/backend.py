"""A small application back end on the Switchyard SDK (clients/python).

It does the three things a back end does for a Switchyard fleet:

- serves the clients' ``rpc`` calls (``orders.place``, ``profile.get``);
- answers the router's join hook (routers started with
  ``SWITCHYARD_AUTHZ_REQUEST=true``): ``team:<name>`` rooms are for the
  team's members;
- manages users through the application API, behind a tiny HTTP admin
  interface in the shape of a Flask app (routes as decorated functions,
  JSON in and out; plain asyncio, no web framework):

  ====== ==================================== =========================================
  GET    /stats                               fleet-wide counts
  GET    /presence?users=alice,bob            connection counts
  GET    /rooms/<room>/presence               members and who is online
  GET    /users/<user>                        subscriptions and rooms
  POST   /users/<user>/disconnect             {"reconnect": bool, "reason": str}
  POST   /users/<user>/revoke                 tokens issued before now stop working
  POST   /tokens/<jti>/revoke                 {"until": unix s}
  POST   /users/<user>/subscriptions          {"sub", "type", "filters", "min", "max", "fields"}
  DELETE /users/<user>/subscriptions/<sub>
  POST   /users/<user>/rooms/<room>           join (no hook: the back end is trusted)
  DELETE /users/<user>/rooms/<room>           leave
  POST   /events/<type>                       {"users": [...], "data": ...}: a direct event
  ====== ==================================== =========================================

It also logs presence events (a user's first connection opened, last closed).

    bash examples/python/run.sh backend.py --http 127.0.0.1:8088
    curl -s localhost:8088/stats
    curl -s -XPOST localhost:8088/users/alice/disconnect -d '{"reconnect": true}'
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from switchyard import (
    ApiError,
    JoinRequest,
    PresenceEvent,
    RpcError,
    RpcRequest,
    Switchyard,
    ValidationError,
    to_users,
)

log = logging.getLogger("backend")

TEAMS = {"fx": {"alice", "bob"}, "rates": {"carol"}}
"""The application's own data: who is in which team (a database in real life)."""

_order_ids = itertools.count(1)


# ------------------------------------------------------------------ a tiny Flask-like HTTP layer


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[..., Awaitable[Any]]


class App:
    """Routes ``METHOD /path/<param>`` to ``async def view(body, query, **params) -> JSON``."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        pattern = re.compile("^" + re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", path) + "$")

        def register(view: Handler) -> Handler:
            self.routes.append((method, pattern, view))
            return view

        return register

    async def dispatch(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        url = urlsplit(target)
        for m, pattern, view in self.routes:
            found = pattern.match(url.path)
            if found and m == method:
                params = {k: unquote(v) for k, v in found.groupdict().items()}
                try:
                    data = json.loads(body) if body else {}
                except ValueError:
                    return 400, {"error": "the body is not JSON"}
                try:
                    return 200, await view(data, parse_qs(url.query), **params)
                except HttpError as e:
                    return e.status, {"error": e.message}
                except ValidationError as e:  # refused by the SDK before sending
                    return 400, {"error": str(e)}
                except ApiError as e:  # refused or not done by the fleet
                    return (503 if e.retryable else 400 if e.code != "internal" else 500), {
                        "error": e.code,
                        "message": e.message,
                    }
        return 404, {"error": f"no route for {method} {url.path}"}

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            length = int(headers.get("content-length", "0"))
            if length > 1 << 20:
                raise HttpError(413, "body too large")
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            status, payload = await self.dispatch(method, target, body)
        except HttpError as e:
            status, payload = e.status, {"error": e.message}
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
            status, payload = 400, {"error": "bad request"}
        out = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(out)}\r\nConnection: close\r\n\r\n".encode()
            + out
        )
        try:
            await writer.drain()
        finally:
            writer.close()


# ------------------------------------------------------------------ the back end


def build(sy: Switchyard) -> App:
    # ---- rpc: what clients call with {"op":"rpc","method":...}

    @sy.rpc("orders.place")
    async def place_order(req: RpcRequest) -> dict[str, Any]:
        order = req.data if isinstance(req.data, dict) else {}
        qty = order.get("qty")
        if not isinstance(qty, int) or qty <= 0:
            raise RpcError("invalid_order", "qty must be a positive integer")
        if "trader" not in req.roles:
            raise RpcError("forbidden", "only traders place orders")
        order_id = next(_order_ids)
        # Tell every connection of the user, through the fleet, that the order is in.
        await sy.publish("order", {"order": order_id, "state": "accepted"}, target=to_users([req.user]))
        return {"order": order_id, "symbol": order.get("symbol"), "qty": qty}

    @sy.rpc("profile.get")
    async def profile(req: RpcRequest) -> dict[str, Any]:
        teams = sorted(t for t, members in TEAMS.items() if req.user in members)
        return {"user": req.user, "roles": req.roles, "teams": teams}

    # ---- the join hook: rooms the token's `rooms` claim does not allow

    @sy.authorize_join
    async def may_join(req: JoinRequest) -> bool | tuple[bool, str]:
        if req.room.startswith("team:"):
            team = req.room.removeprefix("team:")
            if req.user in TEAMS.get(team, set()):
                return True
            return False, f"only members of team {team} may join"
        return False, "unknown room"

    # ---- presence events

    @sy.on_presence
    def presence(ev: PresenceEvent) -> None:
        log.info("%s is %s (%d)", ev.user, "online" if ev.online else "offline", ev.ts)

    # ---- the admin HTTP interface: the application API

    app = App()

    @app.route("GET", "/stats")
    async def stats(body: Any, query: dict[str, list[str]]) -> Any:
        return vars(await sy.stats())

    @app.route("GET", "/presence")
    async def presence_of(body: Any, query: dict[str, list[str]]) -> Any:
        users = [u for part in query.get("users", []) for u in part.split(",") if u]
        return await sy.presence(users)

    @app.route("GET", "/rooms/<room>/presence")
    async def room_presence(body: Any, query: dict[str, list[str]], room: str) -> Any:
        limit = int(query["limit"][0]) if "limit" in query else None
        return vars(await sy.room_presence(room, limit=limit))

    @app.route("GET", "/users/<user>")
    async def listing(body: Any, query: dict[str, list[str]], user: str) -> Any:
        found = await sy.list(user)
        return {"subs": [vars(s) for s in found.subs], "rooms": found.rooms}

    @app.route("POST", "/users/<user>/disconnect")
    async def disconnect(body: Any, query: dict[str, list[str]], user: str) -> Any:
        closed = await sy.disconnect(user, reconnect=bool(body.get("reconnect", False)), reason=body.get("reason"))
        return {"connections": closed}

    @app.route("POST", "/users/<user>/revoke")
    async def revoke_user(body: Any, query: dict[str, list[str]], user: str) -> Any:
        await sy.revoke_user(user, before=time.time())
        return {}

    @app.route("POST", "/tokens/<jti>/revoke")
    async def revoke_token(body: Any, query: dict[str, list[str]], jti: str) -> Any:
        if "until" not in body:
            raise HttpError(400, "until (the token's exp, unix s) is required")
        await sy.revoke_token(jti, until=body["until"])
        return {}

    @app.route("POST", "/users/<user>/subscriptions")
    async def subscribe(body: Any, query: dict[str, list[str]], user: str) -> Any:
        if "sub" not in body or "type" not in body:
            raise HttpError(400, "sub and type are required")
        await sy.subscribe(
            user,
            body["sub"],
            body["type"],
            filters=body.get("filters"),
            min=body.get("min"),
            max=body.get("max"),
            fields=body.get("fields"),
        )
        return {}

    @app.route("DELETE", "/users/<user>/subscriptions/<sub>")
    async def unsubscribe(body: Any, query: dict[str, list[str]], user: str, sub: str) -> Any:
        await sy.unsubscribe(user, sub)
        return {}

    @app.route("POST", "/users/<user>/rooms/<room>")
    async def join(body: Any, query: dict[str, list[str]], user: str, room: str) -> Any:
        await sy.join(user, room)
        return {}

    @app.route("DELETE", "/users/<user>/rooms/<room>")
    async def leave(body: Any, query: dict[str, list[str]], user: str, room: str) -> Any:
        await sy.leave(user, room)
        return {}

    @app.route("POST", "/events/<type>")
    async def publish(body: Any, query: dict[str, list[str]], type: str) -> Any:
        ack = await sy.publish(type, body.get("data"), target=to_users(body.get("users", [])))
        return {"stream": ack.stream, "seq": ack.seq} if ack else {}

    return app


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A Switchyard application back end: rpc, join hook, admin HTTP API")
    p.add_argument("--nats-url", default=os.environ.get("SWITCHYARD_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--prefix", default=os.environ.get("SWITCHYARD_PREFIX", "sy"))
    p.add_argument("--http", default="127.0.0.1:8088", help="admin HTTP listen address (host:port; port 0 picks one)")
    return p.parse_args()


async def main() -> None:
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, _, port = a.http.rpartition(":")
    async with await Switchyard.connect(a.nats_url, prefix=a.prefix, name="switchyard-python-backend") as sy:
        app = build(sy)
        await sy.start()
        server = await asyncio.start_server(app.serve_connection, host or "127.0.0.1", int(port))
        bound = server.sockets[0].getsockname()
        print(f"backend: ready, admin HTTP on http://{bound[0]}:{bound[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
    print("backend: stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
