"""The :class:`Switchyard` client: one NATS connection, used by an application back end.

It owns the NATS subscriptions it makes (rpc methods, authorization hooks,
presence events) and the tasks that run handlers, and ends them in
:meth:`Switchyard.close`. It closes the NATS connection only when it opened
it (:meth:`Switchyard.connect`); a wrapped connection stays the caller's.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from . import api, rules
from ._codec import JSON_HEADERS, DecodeError, Encoding, decode_map, encode, is_json
from .errors import ApiTimeout, InternalError, NoResponders, RpcError, SwitchyardError, ValidationError
from .events import Priority, Target, build_event
from .handlers import (
    AuthzKind,
    JoinRequest,
    RpcRequest,
    SubscribeRequest,
    authz_reply,
    parse_authz,
    parse_rpc,
    rpc_error,
    rpc_error_from,
    rpc_result,
)

log = logging.getLogger("switchyard")

DEFAULT_QUEUE = "switchyard-app"
"""Queue group of rpc and authorization subscriptions: replicas of a back end share the requests."""

F = TypeVar("F", bound=Callable[..., Any])
RpcHandler = Callable[[RpcRequest], Any]
"""``async def handler(req: RpcRequest) -> Any`` (a plain function works too)."""
PresenceHandler = Callable[[api.PresenceEvent], Any]

MsgCallback = Callable[[Msg], Awaitable[None]]


@dataclass(frozen=True)
class PublishAck:
    """JetStream's acknowledgement of a published event: stored as ``seq`` in ``stream``."""

    stream: str
    seq: int
    duplicate: bool = False
    """True when the stream had already stored a message with this event's ``id`` (``Nats-Msg-Id``)."""


class Switchyard:
    """A back end's handle on a Switchyard fleet, over one NATS connection.

    Open one with :meth:`connect`, or wrap a connection you already have:
    ``Switchyard(nc, prefix="sy")``. Use it as an async context manager, or
    call :meth:`close`.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        prefix: str = "sy",
        timeout: float = 5.0,
        queue: str = DEFAULT_QUEUE,
        api_encoding: Encoding = "msgpack",
        max_concurrency: int = 256,
        owns_connection: bool = False,
    ) -> None:
        """
        :param nc: a connected nats-py client.
        :param prefix: the fleet's subject prefix (``SWITCHYARD_PREFIX``).
        :param timeout: default seconds to wait for API replies and publish acknowledgements.
        :param queue: queue group of the rpc and authorization subscriptions.
        :param api_encoding: how API requests are encoded (replies come back the same way).
        :param max_concurrency: most handler calls (rpc and authorization) running at once.
        :param owns_connection: close ``nc`` in :meth:`close`.
        """
        if timeout <= 0:
            raise ValidationError("timeout must be positive")
        if max_concurrency < 1:
            raise ValidationError("max_concurrency must be at least 1")
        if api_encoding not in ("msgpack", "json"):
            raise ValidationError("api_encoding must be 'msgpack' or 'json'")
        self._nc = nc
        self._prefix = rules.check_prefix(prefix)
        self._timeout = timeout
        self._queue = queue
        self._api_encoding: Encoding = api_encoding
        self._owns = owns_connection
        self._js = nc.jetstream()
        self._rpc: dict[str, RpcHandler] = {}
        self._authz: dict[str, Callable[[Any], Any]] = {}
        self._registrations: builtins.list[tuple[str, str, MsgCallback]] = []
        self._subs: builtins.list[NatsSubscription] = []
        self._pending: builtins.list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._presence_streams: set[PresenceEvents] = set()
        self._started = False
        self._closed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        servers: str | builtins.list[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = "sy",
        timeout: float = 5.0,
        queue: str = DEFAULT_QUEUE,
        api_encoding: Encoding = "msgpack",
        max_concurrency: int = 256,
        **nats_options: Any,
    ) -> Switchyard:
        """Connects to NATS (``nats_options`` go to ``nats.connect``) and returns a client owning the connection."""
        rules.check_prefix(prefix)
        nats_options.setdefault("name", "switchyard-python")
        nc = await nats.connect(servers, **nats_options)
        try:
            return cls(
                nc,
                prefix=prefix,
                timeout=timeout,
                queue=queue,
                api_encoding=api_encoding,
                max_concurrency=max_concurrency,
                owns_connection=True,
            )
        except BaseException:
            # A bad setting must not leave the connection open.
            await nc.close()
            raise

    @property
    def nc(self) -> NATS:
        """The underlying nats-py connection."""
        return self._nc

    @property
    def prefix(self) -> str:
        return self._prefix

    async def __aenter__(self) -> Switchyard:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float = 5.0) -> None:
        """Stops taking requests, lets running handlers finish (up to ``grace`` seconds), and closes the connection if owned."""
        if self._closed.is_set():
            return
        self._closed.set()
        for task in self._pending:
            task.cancel()
        for stream in builtins.list(self._presence_streams):
            await stream.aclose()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as e:
                log.debug("unsubscribe failed while closing: %s", e)
        self._subs.clear()
        if self._tasks:
            _, late = await asyncio.wait(builtins.list(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
        if self._owns and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except nats.errors.Error as e:
                log.warning("NATS drain failed (%s); closing", e)
                await self._nc.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ------------------------------------------------------------ publishing

    async def publish(
        self,
        type: str,
        data: Any,
        *,
        target: Target,
        key: str | None = None,
        id: str | int | None = None,
        prio: Priority | None = None,
        durable: bool = True,
        encoding: Encoding = "msgpack",
        ack: bool = True,
        timeout: float | None = None,
    ) -> PublishAck | None:
        """Publishes one event (protocol section 2) on ``<prefix>.events.<type>[.<key>]``.

        With ``ack=True`` (default) it is a JetStream publish: it returns once
        the event stream has stored the event (:class:`PublishAck`), and an
        ``id`` also becomes the ``Nats-Msg-Id``, so retrying a publish is safe.
        With ``ack=False`` it is a plain NATS publish (returns ``None``;
        :meth:`flush` to be sure it left).
        """
        ev = build_event(
            self._prefix, type, data, target=target, key=key, id=id, prio=prio, durable=durable, encoding=encoding
        )
        if not ack:
            await self._nc.publish(ev.subject, ev.payload, headers=ev.headers)
            return None
        headers = dict(ev.headers or {})
        if ev.msg_id is not None:
            headers["Nats-Msg-Id"] = ev.msg_id
        try:
            pa = await self._js.publish(
                ev.subject, ev.payload, timeout=timeout or self._timeout, headers=headers or None
            )
        except nats.errors.NoRespondersError as e:
            raise NoResponders(
                "unavailable", f"no event stream captures {ev.subject} (no router has created the streams yet?)"
            ) from e
        except nats.errors.TimeoutError as e:
            raise ApiTimeout("unavailable", f"no acknowledgement for {ev.subject} in time") from e
        return PublishAck(stream=pa.stream, seq=pa.seq, duplicate=bool(pa.duplicate))

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until NATS has received everything published so far."""
        await self._nc.flush(timeout=int(max(1, round(timeout or self._timeout))))

    # ------------------------------------------------------------ handlers

    def rpc(self, method: str) -> Callable[[F], F]:
        """Decorator: serve the client op ``rpc`` for ``method``.

        The handler gets an :class:`RpcRequest` and returns the ``data`` to send
        back, or raises :class:`RpcError` for an ``error`` frame with its code.
        Any other exception answers ``internal`` (and is logged).
        """
        rules.check_method(method)

        def register(handler: F) -> F:
            if method in self._rpc:
                raise ValidationError(f"rpc method {method!r} already has a handler")
            self._rpc[method] = handler
            self._after_register(f"{self._prefix}.rpc.{method}", self._rpc_callback(method, handler))
            return handler

        return register

    def authorize(self, kind: AuthzKind) -> Callable[[F], F]:
        """Decorator: answer the router's authorization hook for ``kind`` (``"join"`` or ``"subscribe"``).

        The handler gets a :class:`JoinRequest` or :class:`SubscribeRequest` and
        returns ``True``/``False`` or ``(allowed, reason)``; the reason is shown
        to the client in ``error forbidden``. The router asks only when
        ``SWITCHYARD_AUTHZ_REQUEST=true``, only about what the token's ``rooms``
        and the public rooms/types do not allow, and reuses answers for
        ``SWITCHYARD_AUTHZ_CACHE_S``. A handler that raises gets no answer
        sent: the router denies after its timeout, and does not cache that.
        """
        if kind not in ("join", "subscribe"):
            raise ValidationError(f"authorization kind must be 'join' or 'subscribe', not {kind!r}")

        def register(handler: F) -> F:
            if kind in self._authz:
                raise ValidationError(f"the {kind} authorization hook already has a handler")
            self._authz[kind] = handler
            self._after_register(f"{self._prefix}.authz.{kind}", self._authz_callback(kind, handler))
            return handler

        return register

    def authorize_join(self, handler: Callable[[JoinRequest], Any]) -> Callable[[JoinRequest], Any]:
        """Decorator: ``@sy.authorize_join`` is ``@sy.authorize("join")``."""
        return self.authorize("join")(handler)

    def authorize_subscribe(self, handler: Callable[[SubscribeRequest], Any]) -> Callable[[SubscribeRequest], Any]:
        """Decorator: ``@sy.authorize_subscribe`` is ``@sy.authorize("subscribe")``."""
        return self.authorize("subscribe")(handler)

    def on_presence(self, handler: PresenceHandler) -> PresenceHandler:
        """Decorator: call ``handler(PresenceEvent)`` for every presence event (every replica gets every event)."""
        async def cb(msg: Msg) -> None:
            ev = _presence_event(msg)
            if ev is None:
                return
            try:
                result = handler(ev)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("presence handler failed for %s", ev)

        self._after_register(f"{self._prefix}.presence.*", cb, queue="")
        return handler

    def _after_register(self, subject: str, cb: MsgCallback, queue: str | None = None) -> None:
        if self._closed.is_set():
            raise SwitchyardError("this Switchyard client is closed")
        group = self._queue if queue is None else queue
        self._registrations.append((subject, group, cb))
        if self._started:
            self._pending.append(asyncio.ensure_future(self._subscribe(subject, group, cb)))

    async def _subscribe(self, subject: str, queue: str, cb: MsgCallback) -> None:
        sub = await self._nc.subscribe(subject, queue=queue, cb=cb)
        self._subs.append(sub)

    async def start(self) -> None:
        """Subscribes every registered handler and waits until NATS has the subscriptions.

        Handlers registered later are subscribed at once; call ``start()``
        again to wait for them.
        """
        if self._closed.is_set():
            raise SwitchyardError("this Switchyard client is closed")
        if not self._started:
            self._started = True
            for subject, queue, cb in self._registrations:
                await self._subscribe(subject, queue, cb)
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
        await self._nc.flush()

    async def serve(self) -> None:
        """:meth:`start`, then run the handlers until :meth:`close` is called."""
        await self.start()
        await self._closed.wait()

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                self._slots.release()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rpc_callback(self, method: str, handler: RpcHandler) -> MsgCallback:
        async def cb(msg: Msg) -> None:
            # Waiting for a slot here makes NATS buffer the rest (bounded by its pending limits).
            await self._slots.acquire()
            self._spawn(self._serve_rpc(method, handler, msg))

        return cb

    async def _serve_rpc(self, method: str, handler: RpcHandler, msg: Msg) -> None:
        try:
            req = parse_rpc(method, msg.data, msg.headers)
        except DecodeError as e:
            log.warning("undecodable rpc request on %s: %s", msg.subject, e)
            reply = rpc_error("bad_request", "undecodable request")
        else:
            try:
                result = handler(req)
                if inspect.isawaitable(result):
                    result = await result
                reply = rpc_result(result)
            except RpcError as e:
                reply = rpc_error_from(e)
            except ValidationError as e:
                log.error("rpc %s: the handler's result cannot be encoded: %s", method, e)
                reply = rpc_error("internal", "internal error")
            except Exception:
                log.exception("rpc %s: handler failed (user %s)", method, req.user)
                reply = rpc_error("internal", "internal error")
        await _respond(msg, reply)

    def _authz_callback(self, kind: AuthzKind, handler: Callable[[Any], Any]) -> MsgCallback:
        async def cb(msg: Msg) -> None:
            await self._slots.acquire()
            self._spawn(self._serve_authz(kind, handler, msg))

        return cb

    async def _serve_authz(self, kind: AuthzKind, handler: Callable[[Any], Any], msg: Msg) -> None:
        try:
            req = parse_authz(kind, msg.data)
            decision = handler(req)
            if inspect.isawaitable(decision):
                decision = await decision
            reply = authz_reply(decision)
        except Exception:
            # No answer: the router denies after its timeout and caches nothing.
            log.exception("%s authorization handler failed; no answer sent (the router denies)", kind)
            return
        await _respond(msg, reply)

    # ------------------------------------------------------------ presence events

    def presence_events(self, queue: str | None = None, max_pending: int = 10_000) -> PresenceEvents:
        """Presence events as an async iterator: ``async for ev in sy.presence_events(): ...``.

        The subscription starts at the first iteration, or earlier with
        ``async with sy.presence_events() as events`` (or ``await events.start()``).
        Without ``queue`` every subscriber gets every event; with one, the
        subscribers of that queue group share them.
        """
        stream = PresenceEvents(self, queue, max_pending)
        self._presence_streams.add(stream)
        return stream

    # ------------------------------------------------------------ application API

    async def _api(self, method: str, body: Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
        if self._closed.is_set():
            raise SwitchyardError("this Switchyard client is closed")
        subject = f"{self._prefix}.api.{method}"
        enc = self._api_encoding
        headers = dict(JSON_HEADERS) if enc == "json" else None
        wait = timeout or self._timeout
        try:
            msg = await self._nc.request(subject, encode(dict(body), enc), timeout=wait, headers=headers)
        except nats.errors.NoRespondersError as e:
            raise NoResponders("unavailable", f"nothing answers on {subject} (no router, or one without the API)") from e
        except nats.errors.TimeoutError as e:
            raise ApiTimeout("unavailable", f"no reply on {subject} within {wait:g} s") from e
        try:
            # The reply uses the request's encoding (a header saying JSON is honoured too).
            reply = decode_map(msg.data, "json" if enc == "json" or is_json(msg.headers) else "msgpack")
        except DecodeError as e:
            raise InternalError("internal", f"undecodable reply on {subject}: {e}") from e
        return api.unwrap_reply(reply)

    async def disconnect(
        self, user: str, reconnect: bool = False, reason: str | None = None, *, timeout: float | None = None
    ) -> int:
        """Closes every connection of ``user`` with 4003 (after a ``reconnect`` frame when ``reconnect``); returns how many."""
        return api.connections_from(await self._api("disconnect", api.disconnect_request(user, reconnect, reason), timeout))

    async def revoke_user(self, user: str, before: Any, *, timeout: float | None = None) -> None:
        """Revokes ``user``'s tokens issued (``iat``) before ``before`` (unix s or aware datetime); live ones close with 4001."""
        await self._api("revoke", api.revoke_user_request(user, before), timeout)

    async def revoke_token(self, jti: str, until: Any, *, timeout: float | None = None) -> None:
        """Revokes the token with this ``jti`` until ``until`` (unix s or aware datetime: its ``exp`` is enough)."""
        await self._api("revoke", api.revoke_token_request(jti, until), timeout)

    async def subscribe(
        self,
        user: str,
        sub: str,
        type: str,
        filters: Mapping[str, Iterable[str]] | None = None,
        min: Mapping[str, float | int] | None = None,
        max: Mapping[str, float | int] | None = None,
        fields: Iterable[str] | None = None,
        snapshot: bool | None = None,
        throttle_ms: int | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Adds (or replaces, by name) a subscription of ``user``, online or not, as the client op would."""
        body = api.subscribe_request(
            user,
            sub,
            type,
            filters=filters,
            min=min,
            max=max,
            fields=fields,
            snapshot=snapshot,
            throttle_ms=throttle_ms,
        )
        await self._api("subscribe", body, timeout)

    async def unsubscribe(self, user: str, sub: str, *, timeout: float | None = None) -> None:
        await self._api("unsubscribe", api.user_sub_request(user, sub), timeout)

    async def join(self, user: str, room: str, *, timeout: float | None = None) -> None:
        """Makes ``user`` a member of ``room`` (no authorization: the application is trusted)."""
        await self._api("join", api.user_room_request(user, room), timeout)

    async def leave(self, user: str, room: str, *, timeout: float | None = None) -> None:
        await self._api("leave", api.user_room_request(user, room), timeout)

    async def list(self, user: str, *, timeout: float | None = None) -> api.Listing:
        """``user``'s subscriptions and rooms."""
        return api.listing_from(await self._api("list", api.user_request(user), timeout))

    async def presence(self, users: Iterable[str], *, timeout: float | None = None) -> dict[str, int]:
        """Connection counts of those ``users`` (at most 1000) that have at least one connection."""
        body = api.presence_request(users)
        if not body["users"]:
            return {}
        return api.presence_from(await self._api("presence", body, timeout))

    async def room_presence(self, room: str, limit: int | None = None, *, timeout: float | None = None) -> api.RoomPresence:
        return api.room_presence_from(await self._api("room_presence", api.room_presence_request(room, limit), timeout))

    async def stats(self, *, timeout: float | None = None) -> api.Stats:
        return api.stats_from(await self._api("stats", {}, timeout))


async def _respond(msg: Msg, payload: bytes) -> None:
    if not msg.reply:
        log.warning("request on %s has no reply subject; answer dropped", msg.subject)
        return
    try:
        await msg.respond(payload)
    except nats.errors.Error as e:
        log.warning("could not answer on %s: %s", msg.subject, e)


def _presence_event(msg: Msg) -> api.PresenceEvent | None:
    tail = msg.subject.rsplit(".", 1)[-1]
    if tail not in ("online", "offline"):
        return None
    try:
        return api.presence_event_from(tail, decode_map(msg.data))
    except (DecodeError, ValueError) as e:
        log.warning("malformed presence event on %s: %s", msg.subject, e)
        return None


_END = object()


class PresenceEvents:
    """Presence events of the fleet (``<prefix>.presence.online`` / ``.offline``), as an async iterator."""

    def __init__(self, sy: Switchyard, queue: str | None, max_pending: int) -> None:
        self._sy = sy
        self._queue_group = queue or ""
        self._items: asyncio.Queue[object] = asyncio.Queue(max_pending)
        self._sub: NatsSubscription | None = None
        self._done = False
        self._dropped = 0

    async def start(self) -> PresenceEvents:
        """Subscribes now (so no event after this call is missed)."""
        if self._sub is None and not self._done:
            self._sub = await self._sy.nc.subscribe(
                f"{self._sy.prefix}.presence.*", queue=self._queue_group, cb=self._on_msg
            )
            await self._sy.nc.flush()
        return self

    async def _on_msg(self, msg: Msg) -> None:
        ev = _presence_event(msg)
        if ev is None:
            return
        try:
            self._items.put_nowait(ev)
        except asyncio.QueueFull:
            self._dropped += 1
            log.warning("presence events: consumer too slow, %d dropped so far", self._dropped)

    @property
    def dropped(self) -> int:
        """Events dropped because the consumer did not keep up (``max_pending`` waiting)."""
        return self._dropped

    def __aiter__(self) -> PresenceEvents:
        return self

    async def __anext__(self) -> api.PresenceEvent:
        if self._done and self._items.empty():
            raise StopAsyncIteration
        await self.start()
        item = await self._items.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        assert isinstance(item, api.PresenceEvent)
        return item

    async def next(self, timeout: float | None = None) -> api.PresenceEvent:
        """The next event, waiting at most ``timeout`` seconds (``TimeoutError`` then)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def aclose(self) -> None:
        """Unsubscribes; iteration ends after the events already received."""
        if self._done:
            return
        self._done = True
        self._sy._presence_streams.discard(self)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error as e:
                log.debug("unsubscribe failed: %s", e)
        try:
            self._items.put_nowait(_END)
        except asyncio.QueueFull:
            pass

    async def __aenter__(self) -> PresenceEvents:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

