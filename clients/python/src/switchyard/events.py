"""Producer events (protocol section 2): targets, the envelope and its subject.

Pure code: :func:`build_event` turns the arguments of
:meth:`Switchyard.publish <switchyard.Switchyard.publish>` into the subject,
the payload bytes and the headers to send, validating every rule on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import rules
from ._codec import JSON_HEADERS, Encoding, encode
from .errors import ValidationError

Priority = Literal["low", "normal", "high", "critical"]


@dataclass(frozen=True)
class Target:
    """Who gets an event: build one with :func:`to_users`, :func:`to_room`, :func:`to_all` or :func:`to_match`."""

    wire: Mapping[str, Any]
    """The ``target`` map as sent."""

    def to_wire(self) -> dict[str, Any]:
        """A fresh copy of the ``target`` map."""
        return dict(self.wire)


def to_users(users: Iterable[str]) -> Target:
    """Direct delivery to these users (1 to 10,000 valid user ids)."""
    if isinstance(users, str):
        raise ValidationError("to_users takes a list of user ids, not one string")
    ids = [rules.check_user(u) for u in users]
    if not 1 <= len(ids) <= rules.MAX_TARGET_USERS:
        raise ValidationError(f"to_users needs 1 to {rules.MAX_TARGET_USERS} user ids, got {len(ids)}")
    return Target({"users": ids})


def to_room(room: str) -> Target:
    """Every member of ``room``, online now or resuming later."""
    return Target({"room": rules.check_room(room)})


def to_all() -> Target:
    """Every user with a live connection (durable broadcasts are also replayed on resume)."""
    return Target({"all": True})


def to_match(
    match: Mapping[str, str],
    values: Mapping[str, float | int] | None = None,
    type: str | None = None,
) -> Target:
    """Every user whose subscription matches.

    ``match`` maps dimensions to string values (at most 64 bytes), ``values``
    fields to numbers (checked against the subscriptions' ``min``/``max``),
    ``type`` is the subscription type to match (default: the event's type).
    """
    if not isinstance(match, Mapping):
        raise ValidationError("to_match: match must be a mapping {dimension: value}")
    wire: dict[str, Any] = {
        "match": {rules.check_type(k, "dimension"): rules.check_value(v, f"match value of {k!r}") for k, v in match.items()}
    }
    if values is not None:
        if not isinstance(values, Mapping):
            raise ValidationError("to_match: values must be a mapping {field: number}")
        wire["values"] = {rules.check_type(k, "field"): rules.check_number(v, f"value of {k!r}") for k, v in values.items()}
    if type is not None:
        wire["type"] = rules.check_type(type, "subscription type")
    return Target(wire)


@dataclass(frozen=True)
class OutgoingEvent:
    """What :func:`build_event` produced: ready to publish on NATS."""

    subject: str
    payload: bytes
    headers: dict[str, str] | None = None
    msg_id: str | None = None
    """Value for the ``Nats-Msg-Id`` header of a JetStream publish (the event ``id``)."""


def event_subject(prefix: str, type: str, key: str | None = None) -> str:
    """``<prefix>.events.<type>`` or ``<prefix>.events.<type>.<key>``."""
    rules.check_type(type, "event type")
    if key is None:
        return f"{prefix}.events.{type}"
    if not rules.is_subject_token(key):
        raise ValidationError(f"key {key!r} is not a subject token")
    return f"{prefix}.events.{type}.{key}"


def build_event(
    prefix: str,
    type: str,
    data: Any,
    *,
    target: Target,
    key: str | None = None,
    id: str | int | None = None,
    prio: Priority | None = None,
    durable: bool = True,
    encoding: Encoding = "msgpack",
) -> OutgoingEvent:
    """The subject, payload and headers of one producer event.

    A ``key`` that is a valid subject token goes in the subject (ordering and
    conflation by key, one stream subject per key); any other key of 1 to 256
    bytes goes in the payload's ``key`` field.
    """
    rules.check_type(type, "event type")
    if not isinstance(target, Target):
        raise ValidationError("target must be built with to_users, to_room, to_all or to_match")
    envelope: dict[str, Any] = {"data": data, "target": target.to_wire()}
    subject_key: str | None = None
    if key is not None:
        rules.check_str_bytes(key, "key", rules.MAX_KEY_BYTES)
        if rules.is_subject_token(key):
            subject_key = key
        else:
            envelope["key"] = key
    msg_id: str | None = None
    if id is not None:
        if isinstance(id, bool) or not isinstance(id, (str, int)):
            raise ValidationError(f"id must be a string or an integer, got {id.__class__.__name__}")
        if isinstance(id, str):
            rules.check_str_bytes(id, "id", rules.MAX_ID_BYTES)
        elif not -(2**63) <= id < 2**64:
            raise ValidationError("an integer id must fit in 64 bits")
        envelope["id"] = id
        msg_id = str(id)
    if prio is not None:
        if prio not in rules.PRIORITIES:
            raise ValidationError(f"prio must be one of {', '.join(rules.PRIORITIES)}, got {prio!r}")
        if prio != "normal":
            envelope["prio"] = prio
    if not isinstance(durable, bool):
        raise ValidationError("durable must be a bool")
    if not durable:
        envelope["durable"] = False
    payload = encode(envelope, encoding)
    headers = dict(JSON_HEADERS) if encoding == "json" else None
    return OutgoingEvent(
        subject=event_subject(prefix, type, subject_key),
        payload=payload,
        headers=headers,
        msg_id=msg_id,
    )

