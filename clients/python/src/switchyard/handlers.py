"""Requests the fleet sends to the application: client rpc and authorization.

Pure code: parse a request payload into a typed request, and encode the
reply. :class:`~switchyard.Switchyard` subscribes and calls the handlers.

- rpc (protocol section 2, "Application RPC"): request on
  ``<prefix>.rpc.<method>``, MessagePack ``{"user","roles","data"}``; reply
  ``{"data": ...}`` or ``{"error": {"code","message"}}``.
- authorization hook (router ``SWITCHYARD_AUTHZ_REQUEST=true``): request on
  ``<prefix>.authz.join`` with ``{"kind","user","roles","rooms","room"}`` or
  ``<prefix>.authz.subscribe`` with ``{"kind","user","roles","rooms","type","filters"}``;
  reply ``{"allow": bool, "message"?: str}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ._codec import DecodeError, decode_map, encode
from .errors import RpcError

AuthzKind = Literal["join", "subscribe"]

# What an authorization handler may return: a bool, or (bool, reason shown to the client).
AuthzDecision = Union[bool, tuple[bool, str]]


@dataclass(frozen=True)
class RpcRequest:
    """A client's ``rpc`` op: who asked (from the verified token) and what."""

    method: str
    user: str
    roles: list[str]
    data: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JoinRequest:
    """May ``user`` join ``room``? (Asked only for rooms the token's ``rooms`` and the public rooms do not allow.)"""

    user: str
    roles: list[str]
    rooms: list[str]
    room: str
    kind: Literal["join"] = "join"


@dataclass(frozen=True)
class SubscribeRequest:
    """May ``user`` subscribe to ``type`` with these filters? (Asked only for types outside the public types.)"""

    user: str
    roles: list[str]
    rooms: list[str]
    type: str
    filters: dict[str, list[str]]
    kind: Literal["subscribe"] = "subscribe"


AuthzRequest = Union[JoinRequest, SubscribeRequest]


def _strings(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise DecodeError(f"{what} is not a list of strings")
    return list(v)


def parse_rpc(method: str, payload: bytes, headers: Mapping[str, str] | None = None) -> RpcRequest:
    body = decode_map(payload)
    user = body.get("user")
    if not isinstance(user, str):
        raise DecodeError("rpc request without a user")
    return RpcRequest(
        method=method,
        user=user,
        roles=_strings(body.get("roles"), "roles"),
        data=body.get("data"),
        headers=dict(headers or {}),
    )


def rpc_result(data: Any) -> bytes:
    """The reply to a successful call (raises ValidationError when ``data`` cannot be encoded)."""
    return encode({"data": data})


def rpc_error(code: str, message: str) -> bytes:
    return encode({"error": {"code": code, "message": message}})


def rpc_error_from(exc: RpcError) -> bytes:
    return rpc_error(exc.code, exc.message)


def parse_authz(kind: AuthzKind, payload: bytes) -> AuthzRequest:
    body = decode_map(payload)
    user = body.get("user")
    if not isinstance(user, str):
        raise DecodeError("authorization request without a user")
    roles = _strings(body.get("roles"), "roles")
    rooms = _strings(body.get("rooms"), "rooms")
    if kind == "join":
        room = body.get("room")
        if not isinstance(room, str):
            raise DecodeError("join authorization request without a room")
        return JoinRequest(user=user, roles=roles, rooms=rooms, room=room)
    ty = body.get("type")
    if not isinstance(ty, str):
        raise DecodeError("subscribe authorization request without a type")
    raw = body.get("filters") or {}
    if not isinstance(raw, Mapping):
        raise DecodeError("filters is not a map")
    filters = {str(k): _strings(v, f"filters.{k}") for k, v in raw.items()}
    return SubscribeRequest(user=user, roles=roles, rooms=rooms, type=ty, filters=filters)


def authz_reply(decision: Any) -> bytes:
    """Encodes a handler's answer: ``True``/``False`` or ``(allowed, reason)``.

    Anything else raises TypeError: a hook must say yes or no explicitly.
    """
    if isinstance(decision, bool):
        allow, message = decision, ""
    elif (
        isinstance(decision, tuple)
        and len(decision) == 2
        and isinstance(decision[0], bool)
        and isinstance(decision[1], str)
    ):
        allow, message = decision
    else:
        raise TypeError(f"an authorization handler returns a bool or (bool, str), not {decision!r}")
    body: dict[str, Any] = {"allow": allow}
    if not allow and message:
        body["message"] = message
    return encode(body)
