"""examples/python against a real fleet: the producer's events arrive, and the
back end answers rpc calls, the join hook and its admin HTTP routes.

The examples run with this interpreter (which has the SDK installed), not
through run.sh (which installs into the repo's .venv; clients/js's
examples.test.mjs covers that command).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .fleet import REPO, WAIT, Fleet, unique

pytestmark = pytest.mark.fleet
EXAMPLES = REPO / "examples" / "python"


async def test_producer_example(fleet: Fleet) -> None:
    c = await fleet.client(unique("prod"))
    try:
        await c.ok("subscribe", sub="aapl", type="tick", filters={"symbol": ["AAPL"]})
        await c.ok("subscribe", sub="alerts", type="pattern")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "producer.py"),
            "--nats-url",
            fleet.nats_url,
            "--rate",
            "40",
            "--alert-every-ms",
            "100",
            "--duration-s",
            "1.5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode()
        assert proc.returncode == 0, text
        m = re.search(r"published (\d+) ticks and (\d+) alerts", text)
        assert m, text
        alerts = int(m.group(2))
        got = [await c.event(lambda e: e["type"] == "pattern") for _ in range(alerts)]
        assert [e["data"]["seq"] for e in got] == list(range(1, alerts + 1)), "alerts in order, none lost"
        assert all(e["prio"] == "high" and e["pos"] > 0 for e in got)
        tick = await c.event(lambda e: e["type"] == "tick")
        assert tick["data"]["symbol"] == "AAPL" and tick["key"] == "AAPL" and "pos" not in tick
    finally:
        await c.close()


@pytest.fixture
async def backend(fleet: Fleet) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "backend.py"),
        "--nats-url",
        fleet.nats_url,
        "--http",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        m = re.search(r"ready, admin HTTP on (http://\S+)", line.decode())
        assert m, f"backend did not start: {line!r}"
        yield m.group(1)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), WAIT)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_backend_example_rpc_and_hook(fleet: Fleet, backend: str) -> None:
    trader = unique("trader")
    c = await fleet.client(trader, roles=["trader"])
    try:
        reply = await c.request("rpc", method="orders.place", data={"symbol": "AAPL", "qty": 5})
        assert reply["op"] == "rpc_result", reply
        assert reply["data"]["qty"] == 5
        note = await c.event(lambda e: e["type"] == "order")
        assert note["data"] == {"order": reply["data"]["order"], "state": "accepted"}
        bad = await c.request("rpc", method="orders.place", data={"qty": 0})
        assert (bad["op"], bad["code"]) == ("error", "invalid_order")
        denied = await c.request("join", room="team:fx")
        assert (denied["code"], denied["message"]) == ("forbidden", "only members of team fx may join")
    finally:
        await c.close()
    # alice is in team fx (the example's data).
    alice = await fleet.client("alice")
    try:
        await alice.ok("join", room="team:fx")
        profile = await alice.request("rpc", method="profile.get")
        assert profile["data"] == {"user": "alice", "roles": [], "teams": ["fx"]}
    finally:
        await alice.close()
    status, body = await asyncio.to_thread(http, "GET", backend + "/nowhere")
    assert status == 404


async def test_backend_example_admin_routes(fleet: Fleet, backend: str, api_sy: object) -> None:
    user = unique("adm")
    c = await fleet.client(user)
    status, body = await asyncio.to_thread(
        http, "POST", f"{backend}/users/{user}/subscriptions", {"sub": "s", "type": "tick", "filters": {"symbol": ["X"]}}
    )
    assert (status, body) == (200, {}), body
    status, body = await asyncio.to_thread(http, "GET", f"{backend}/users/{user}")
    assert status == 200 and [s["sub"] for s in body["subs"]] == ["s"], body
    status, body = await asyncio.to_thread(http, "GET", f"{backend}/stats")
    assert status == 200 and body["connections"] >= 1, body
    status, body = await asyncio.to_thread(http, "POST", f"{backend}/users/{user}/subscriptions", {"sub": "bad name", "type": "tick"})
    assert status == 400, body
    status, body = await asyncio.to_thread(http, "POST", f"{backend}/users/{user}/disconnect", {"reason": "bye"})
    assert (status, body) == (200, {"connections": 1}), body
    assert await c.closed() == 4003
