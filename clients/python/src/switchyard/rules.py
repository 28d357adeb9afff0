"""The protocol's naming rules, checked before anything is sent.

Each ``check_*`` returns its argument or raises
:class:`~switchyard.errors.ValidationError` naming the rule. They mirror the
server's checks (``common/src/ids.rs``), so a request that passes here is
not refused for its names.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ValidationError

USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUB_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
ROOM = re.compile(r"[A-Za-z0-9_:.-]{1,128}")
METHOD = re.compile(r"[a-z][a-z0-9_.]{0,63}")

PRIORITIES = ("low", "normal", "high", "critical")
MAX_VALUE_BYTES = 64
MAX_ID_BYTES = 256
MAX_KEY_BYTES = 256
MAX_TARGET_USERS = 10_000
MAX_PRESENCE_USERS = 1000
MAX_REASON_BYTES = 128
MAX_JTI_BYTES = 128
MAX_THROTTLE_MS = 3_600_000
MAX_ROOM_PRESENCE_LIMIT = 10_000

# ASCII whitespace as Rust's is_ascii_whitespace, plus ASCII control characters.
_BAD_TOKEN_CHARS = frozenset(".*>") | frozenset(" \t\n\x0c\r") | frozenset(chr(c) for c in range(32)) | {"\x7f"}


def _full(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def check_user(user: str, what: str = "user id") -> str:
    if not _full(USER_ID, user):
        raise ValidationError(f"{what} {user!r} breaks the rule [A-Za-z0-9][A-Za-z0-9_-]{{0,63}}")
    return user


def check_sub_name(sub: str) -> str:
    if not _full(SUB_NAME, sub):
        raise ValidationError(f"subscription name {sub!r} breaks the rule [A-Za-z0-9_-]{{1,64}}")
    return sub


def check_type(name: str, what: str = "type") -> str:
    if not _full(TYPE_NAME, name):
        raise ValidationError(f"{what} {name!r} breaks the rule [a-z][a-z0-9_]{{0,31}}")
    return name


def check_room(room: str) -> str:
    if not _full(ROOM, room):
        raise ValidationError(f"room {room!r} breaks the rule [A-Za-z0-9_:.-]{{1,128}}")
    return room


def check_method(method: str) -> str:
    if not _full(METHOD, method):
        raise ValidationError(f"rpc method {method!r} breaks the rule [a-z][a-z0-9_.]{{0,63}}")
    return method


def is_subject_token(s: str) -> bool:
    """One NATS subject token as the server accepts for ``<key>``: non-empty, no ``.``, wildcards, whitespace or controls."""
    return bool(s) and not any(c in _BAD_TOKEN_CHARS for c in s)


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not all(is_subject_token(t) for t in prefix.split(".")):
        raise ValidationError(f"prefix {prefix!r} must be one or more valid subject tokens (like 'sy' or 'acme.sy')")
    return prefix


def check_value(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        raise ValidationError(f"{what} must be a string of at most {MAX_VALUE_BYTES} bytes, got {value!r}")
    return value


def check_number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{what} must be finite, got {value!r}")
    return value


def check_str_bytes(value: Any, what: str, max_bytes: int, min_bytes: int = 1) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    n = len(value.encode("utf-8"))
    if not min_bytes <= n <= max_bytes:
        raise ValidationError(f"{what} must be {min_bytes} to {max_bytes} bytes, got {n}")
    return value


def check_unix_seconds(value: Any, what: str) -> int:
    """A unix time in seconds (int, float or aware datetime), rounded up to whole seconds."""
    import datetime as _dt

    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValidationError(f"{what}: use a timezone-aware datetime (naive ones are ambiguous)")
        value = value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"{what} must be a unix time in seconds, got {value!r}")
    return math.ceil(value)
