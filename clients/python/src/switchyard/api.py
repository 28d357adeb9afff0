"""The application API (protocol section 3): request bodies and typed results.

Pure code: builders return the request map for ``<prefix>.api.<method>``,
:func:`unwrap_reply` turns a reply map into its ``result`` or raises
:class:`~switchyard.errors.ApiError`, and the ``*_from`` functions read each
method's result into a dataclass. :class:`~switchyard.Switchyard` sends them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import rules
from .errors import ApiError, InternalError, ValidationError

# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Subscription:
    """One subscription of a user, as ``list`` shows it."""

    sub: str
    type: str
    filters: dict[str, list[str]] = field(default_factory=dict)
    min: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    fields: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of the entry this SDK does not know (such as ``snapshot`` or ``throttle_ms``)."""


@dataclass(frozen=True)
class Listing:
    """A user's subscriptions and rooms (``list``)."""

    subs: list[Subscription]
    rooms: list[str]


@dataclass(frozen=True)
class RoomPresence:
    """``room_presence``: member count, the online members (at most ``limit``), and whether more are online."""

    members: int
    online: list[str]
    truncated: bool


@dataclass(frozen=True)
class Stats:
    """Fleet-wide counts (eventually consistent within 2 s)."""

    edges: int
    routers: int
    connections: int
    users: int
    subscriptions: int
    rooms: int


@dataclass(frozen=True)
class PresenceEvent:
    """A user's first connection on the fleet opened (``online``) or the last one closed."""

    user: str
    online: bool
    ts: int
    """Unix milliseconds."""


# ---------------------------------------------------------------- replies


def unwrap_reply(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The ``result`` map of a reply; an ``error`` reply raises the matching :class:`ApiError`."""
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, Mapping):
            raise InternalError("internal", f"malformed error in reply: {err!r}")
        code = err.get("code")
        message = err.get("message", "")
        if not isinstance(code, str) or not code:
            raise InternalError("internal", f"error reply without a code: {dict(err)!r}")
        raise ApiError.from_reply(code, message if isinstance(message, str) else str(message))
    result = reply.get("result")
    if not isinstance(result, Mapping):
        raise InternalError("internal", f"reply has neither a result map nor an error: {dict(reply)!r}")
    return dict(result)


def _int(result: Mapping[str, Any], name: str) -> int:
    v = result.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InternalError("internal", f"reply field {name!r} is not an integer: {v!r}")
    return v


def _str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise InternalError("internal", f"reply field {what!r} is not a list of strings: {v!r}")
    return list(v)


def _num_map(v: Any, what: str) -> dict[str, float]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise InternalError("internal", f"reply field {what!r} is not a map: {v!r}")
    out: dict[str, float] = {}
    for k, n in v.items():
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise InternalError("internal", f"reply field {what}.{k} is not a number: {n!r}")
        out[str(k)] = float(n)
    return out


def connections_from(result: Mapping[str, Any]) -> int:
    return _int(result, "connections")


def subscription_from(entry: Any) -> Subscription:
    if not isinstance(entry, Mapping):
        raise InternalError("internal", f"subscription entry is not a map: {entry!r}")
    sub, ty = entry.get("sub"), entry.get("type")
    if not isinstance(sub, str) or not isinstance(ty, str):
        raise InternalError("internal", f"subscription entry without sub/type: {dict(entry)!r}")
    raw_filters = entry.get("filters") or {}
    if not isinstance(raw_filters, Mapping):
        raise InternalError("internal", f"filters is not a map: {raw_filters!r}")
    filters = {str(k): _str_list(v, f"filters.{k}") for k, v in raw_filters.items()}
    raw_fields = entry.get("fields")
    known = {"sub", "type", "filters", "min", "max", "fields"}
    return Subscription(
        sub=sub,
        type=ty,
        filters=filters,
        min=_num_map(entry.get("min"), "min"),
        max=_num_map(entry.get("max"), "max"),
        fields=None if raw_fields is None else _str_list(raw_fields, "fields"),
        extra={str(k): v for k, v in entry.items() if k not in known},
    )


def listing_from(result: Mapping[str, Any]) -> Listing:
    subs = result.get("subs", [])
    if not isinstance(subs, list):
        raise InternalError("internal", f"subs is not a list: {subs!r}")
    return Listing(subs=[subscription_from(s) for s in subs], rooms=_str_list(result.get("rooms", []), "rooms"))


def presence_from(result: Mapping[str, Any]) -> dict[str, int]:
    users = result.get("users", {})
    if not isinstance(users, Mapping):
        raise InternalError("internal", f"users is not a map: {users!r}")
    out: dict[str, int] = {}
    for user, entry in users.items():
        if not isinstance(entry, Mapping):
            raise InternalError("internal", f"presence entry of {user!r} is not a map: {entry!r}")
        out[str(user)] = _int(entry, "connections")
    return out


def room_presence_from(result: Mapping[str, Any]) -> RoomPresence:
    truncated = result.get("truncated")
    if not isinstance(truncated, bool):
        raise InternalError("internal", f"truncated is not a bool: {truncated!r}")
    return RoomPresence(
        members=_int(result, "members"),
        online=_str_list(result.get("online"), "online"),
        truncated=truncated,
    )


def stats_from(result: Mapping[str, Any]) -> Stats:
    return Stats(
        edges=_int(result, "edges"),
        routers=_int(result, "routers"),
        connections=_int(result, "connections"),
        users=_int(result, "users"),
        subscriptions=_int(result, "subscriptions"),
        rooms=_int(result, "rooms"),
    )


def presence_event_from(subject_tail: str, body: Mapping[str, Any]) -> PresenceEvent:
    """A presence event from the last subject token (``online``/``offline``) and the ``{"user","ts"}`` map."""
    if subject_tail not in ("online", "offline"):
        raise ValueError(f"not a presence subject: {subject_tail!r}")
    user, ts = body.get("user"), body.get("ts")
    if not isinstance(user, str) or isinstance(ts, bool) or not isinstance(ts, int):
        raise ValueError(f"malformed presence event: {dict(body)!r}")
    return PresenceEvent(user=user, online=subject_tail == "online", ts=ts)


# ---------------------------------------------------------------- requests


def disconnect_request(user: str, reconnect: bool = False, reason: str | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"user": rules.check_user(user)}
    if not isinstance(reconnect, bool):
        raise ValidationError("reconnect must be a bool")
    if reconnect:
        req["reconnect"] = True
    if reason is not None:
        req["reason"] = rules.check_str_bytes(reason, "reason", rules.MAX_REASON_BYTES, min_bytes=0)
    return req


def revoke_user_request(user: str, before: Any) -> dict[str, Any]:
    return {"user": rules.check_user(user), "before": rules.check_unix_seconds(before, "before")}


def revoke_token_request(jti: str, until: Any) -> dict[str, Any]:
    return {"jti": rules.check_str_bytes(jti, "jti", rules.MAX_JTI_BYTES), "until": rules.check_unix_seconds(until, "until")}


def subscribe_request(
    user: str,
    sub: str,
    type: str,
    filters: Mapping[str, Iterable[str]] | None = None,
    min: Mapping[str, float | int] | None = None,
    max: Mapping[str, float | int] | None = None,
    fields: Iterable[str] | None = None,
    snapshot: bool | None = None,
    throttle_ms: int | None = None,
) -> dict[str, Any]:
    req: dict[str, Any] = {
        "user": rules.check_user(user),
        "sub": rules.check_sub_name(sub),
        "type": rules.check_type(type, "subscription type"),
    }
    if filters is not None:
        if not isinstance(filters, Mapping):
            raise ValidationError("filters must be a mapping {dimension: [values]}")
        out: dict[str, list[str]] = {}
        for dim, values in filters.items():
            rules.check_type(dim, "dimension")
            if isinstance(values, str):
                raise ValidationError(f"filters[{dim!r}] must be a list of strings, not one string")
            vs = [rules.check_value(v, f"filter value of {dim!r}") for v in values]
            if not vs:
                raise ValidationError(f"filters[{dim!r}] needs at least one value")
            out[dim] = vs
        req["filters"] = out
    for name, bounds in (("min", min), ("max", max)):
        if bounds is not None:
            if not isinstance(bounds, Mapping):
                raise ValidationError(f"{name} must be a mapping {{field: number}}")
            req[name] = {rules.check_type(k, "field"): rules.check_number(v, f"{name}[{k!r}]") for k, v in bounds.items()}
    if fields is not None:
        if isinstance(fields, str):
            raise ValidationError("fields must be a list of names, not one string")
        names = [rules.check_type(f, "field") for f in fields]
        if not names:
            raise ValidationError("fields needs at least one name (leave it out for the whole payload)")
        req["fields"] = names
    if snapshot is not None:
        if not isinstance(snapshot, bool):
            raise ValidationError("snapshot must be a bool")
        req["snapshot"] = snapshot
    if throttle_ms is not None:
        if isinstance(throttle_ms, bool) or not isinstance(throttle_ms, int) or not 1 <= throttle_ms <= rules.MAX_THROTTLE_MS:
            raise ValidationError(f"throttle_ms must be an integer from 1 to {rules.MAX_THROTTLE_MS}")
        req["throttle_ms"] = throttle_ms
    return req


def user_sub_request(user: str, sub: str) -> dict[str, Any]:
    return {"user": rules.check_user(user), "sub": rules.check_sub_name(sub)}


def user_room_request(user: str, room: str) -> dict[str, Any]:
    return {"user": rules.check_user(user), "room": rules.check_room(room)}


def user_request(user: str) -> dict[str, Any]:
    return {"user": rules.check_user(user)}


def presence_request(users: Iterable[str]) -> dict[str, Any]:
    if isinstance(users, str):
        raise ValidationError("presence takes a list of user ids, not one string")
    ids = [rules.check_user(u) for u in users]
    if len(ids) > rules.MAX_PRESENCE_USERS:
        raise ValidationError(f"presence asks about at most {rules.MAX_PRESENCE_USERS} users, got {len(ids)}")
    return {"users": ids}


def room_presence_request(room: str, limit: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"room": rules.check_room(room)}
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= rules.MAX_ROOM_PRESENCE_LIMIT:
            raise ValidationError(f"limit must be an integer from 1 to {rules.MAX_ROOM_PRESENCE_LIMIT}")
        req["limit"] = limit
    return req
