"""A real Switchyard on loopback for the integration tests.

nats-server (JetStream, its own temp dir), switchyard-router and
switchyard-edge as child processes on free ports, HS256 tokens, and
WebSocket clients speaking the MessagePack subprotocol.

Needs ``SWITCHYARD_NATS_SERVER`` (``scripts/install-nats.sh`` prints it;
default ``<repo>/.venv/bin/nats-server``) and the binaries in
``SWITCHYARD_BIN_DIR`` (default ``$CARGO_TARGET_DIR/debug`` or
``<repo>/target/debug``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import msgpack
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO = Path(__file__).resolve().parents[3]
WAIT = 10.0
"""Generous timeout for anything a test waits for."""


def bin_dir() -> Path:
    if os.environ.get("SWITCHYARD_BIN_DIR"):
        return Path(os.environ["SWITCHYARD_BIN_DIR"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug"


def nats_bin() -> Path:
    p = Path(os.environ.get("SWITCHYARD_NATS_SERVER", REPO / ".venv" / "bin" / "nats-server"))
    if not p.exists():
        raise RuntimeError(f"nats-server not found at {p}: run scripts/install-nats.sh and set SWITCHYARD_NATS_SERVER")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unique(name: str) -> str:
    """A name no other test uses (the fleet is shared by the whole session)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        code = self.p.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited ({code}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        if self.p.poll() is not None:
            return
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(grace)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def wait_until(check: Callable[[], bool], what: str, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        if check():
            return
        time.sleep(0.025)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Fleet:
    """nats-server + router + edge. ``router_env`` adds router settings."""

    def __init__(self, router_env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="switchyard-py-"))
        self.nats_port, router_admin, edge_port, self.edge_admin = (free_port() for _ in range(4))
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.ws_url = f"ws://127.0.0.1:{edge_port}/ws"
        self.secret = secrets.token_hex(24)
        self.procs: dict[str, Proc] = {}
        bins = bin_dir()
        try:
            self.procs["nats"] = nats = Proc(
                "nats",
                [str(nats_bin()), "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd", str(self.dir / "nats")],
                {},
                self.dir / "nats.log",
            )
            wait_until(lambda: port_open(self.nats_port), "nats-server", nats)
            self.procs["router"] = router = Proc(
                "router",
                [str(bins / "switchyard-router")],
                {
                    "SWITCHYARD_NATS_URL": self.nats_url,
                    "SWITCHYARD_ADMIN_LISTEN": f"127.0.0.1:{router_admin}",
                    "SWITCHYARD_LOG_STORAGE": "memory",
                    **(router_env or {}),
                },
                self.dir / "router.log",
            )
            wait_until(lambda: http_ok(f"http://127.0.0.1:{router_admin}/readyz"), "router ready", router)
            self.procs["edge"] = edge = Proc(
                "edge",
                [str(bins / "switchyard-edge")],
                {
                    "SWITCHYARD_NATS_URL": self.nats_url,
                    "SWITCHYARD_LISTEN": f"127.0.0.1:{edge_port}",
                    "SWITCHYARD_ADMIN_LISTEN": f"127.0.0.1:{self.edge_admin}",
                    "SWITCHYARD_JWT_SECRET": self.secret,
                    "SWITCHYARD_DRAIN_SPREAD_MS": "300",
                    "SWITCHYARD_DRAIN_TIMEOUT_MS": "3000",
                    "SWITCHYARD_REQUEST_TIMEOUT_MS": "1500",
                },
                self.dir / "edge.log",
            )
            wait_until(lambda: http_ok(f"http://127.0.0.1:{self.edge_admin}/readyz"), "edge ready", edge)
        except BaseException:
            self.stop()
            raise

    def token(self, sub: str, ttl_s: int = 3600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": sub, "iat": now, "exp": now + ttl_s, **claims}
        return jwt.encode(payload, self.secret, algorithm="HS256")

    async def client(self, user: str, *, query: str = "", **claims: Any) -> WsClient:
        """A WebSocket client of ``user``, authenticated by header, after ``ready``."""
        return await WsClient.open(self.ws_url + query, self.token(user, **claims))

    def stop(self) -> None:
        for name in ("edge", "router", "nats"):
            if name in self.procs:
                self.procs[name].stop()
        if not os.environ.get("SWITCHYARD_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)


class Closed(Exception):
    pass


class WsClient:
    """A raw MessagePack WebSocket client: every frame it receives is kept until a test takes it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.ready: dict[str, Any] = {}
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._next_id = 0
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, url: str, token: str) -> WsClient:
        ws = await connect(
            url,
            subprotocols=[websockets.Subprotocol("switchyard.v1.msgpack")],
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=WAIT,
            max_size=2**22,
        )
        c = cls(ws)
        c.ready = await c.wait(lambda f: f["op"] == "ready")
        return c

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, bytes), "a text frame on a MessagePack connection"
                frame = msgpack.unpackb(message, raw=False)
                if frame.get("op") == "batch":
                    self.frames.extend({"op": "event", **e} for e in frame["events"])
                else:
                    self.frames.append(frame)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
            self._changed.set()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT, what: str = "") -> dict[str, Any]:
        """Takes the first received frame matching ``pred``, waiting up to ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, f in enumerate(self.frames):
                if pred(f):
                    return self.frames.pop(i)
            if self.close_code is not None:
                raise Closed(f"closed with {self.close_code} before {what or 'the frame'}; got {self.frames}")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {what or 'matching frame'} within {timeout} s; got {self.frames}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def event(self, pred: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = WAIT) -> dict[str, Any]:
        return await self.wait(lambda f: f["op"] == "event" and pred(f), timeout, "event")

    async def send(self, op: str, **fields: Any) -> int:
        self._next_id += 1
        await self.ws.send(msgpack.packb({"op": op, "id": self._next_id, **fields}))
        return self._next_id

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Sends ``op`` with a fresh id and returns the reply carrying that id."""
        i = await self.send(op, **fields)
        return await self.wait(lambda f: f.get("id") == i and f["op"] != "event", what=f"reply to {op}")

    async def ok(self, op: str, **fields: Any) -> None:
        reply = await self.request(op, **fields)
        assert reply["op"] == "ok", reply

    async def closed(self, timeout: float = WAIT) -> int:
        """Waits for the server to close the connection; the close code."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.close_code is not None
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        try:
            await asyncio.wait_for(self._reader, WAIT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._reader.cancel()


async def refused_status(url: str, token: str) -> int:
    """The HTTP status of an upgrade the edge refuses (fails the test if it is accepted)."""
    try:
        ws = await connect(
            url,
            subprotocols=[websockets.Subprotocol("switchyard.v1.msgpack")],
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=WAIT,
        )
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    raise AssertionError("the upgrade was accepted")
