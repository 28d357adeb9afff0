"""MessagePack and JSON encoding of the maps Switchyard exchanges over NATS.

The only module that touches ``msgpack`` (which ships no type hints), so
everything else sees typed functions. Encoding failures become
:class:`~switchyard.errors.ValidationError`; decoding failures
:class:`DecodeError`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack

from .errors import ValidationError

Encoding = Literal["msgpack", "json"]

JSON_CONTENT_TYPE = "application/json"
JSON_HEADERS = {"Content-Type": JSON_CONTENT_TYPE}


class DecodeError(ValueError):
    """A payload that is not the MessagePack or JSON map it should be."""


def encode(value: Any, encoding: Encoding = "msgpack") -> bytes:
    """Encodes ``value``; a value the encoding cannot carry raises ValidationError."""
    if encoding == "msgpack":
        try:
            out = msgpack.packb(value, use_bin_type=True, datetime=False)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValidationError(f"cannot encode as MessagePack: {e}") from e
        assert isinstance(out, bytes)
        return out
    if encoding == "json":
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValidationError(f"cannot encode as JSON: {e}") from e
        return text.encode("utf-8")
    raise ValidationError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")


def is_json(headers: dict[str, str] | None) -> bool:
    """Whether NATS headers say the payload is JSON (parameters such as charset allowed)."""
    if not headers:
        return False
    for name, value in headers.items():
        if name.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower() == JSON_CONTENT_TYPE
    return False


def decode(payload: bytes, encoding: Encoding = "msgpack") -> Any:
    """Decodes one MessagePack value (or JSON text); raises DecodeError."""
    if encoding == "json":
        try:
            return json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DecodeError(f"not JSON: {e}") from e
    try:
        # strict_map_key=False: a map with integer keys is still a map we can report on.
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, timestamp=0)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise DecodeError(f"not MessagePack: {e}") from e


def decode_map(payload: bytes, encoding: Encoding = "msgpack") -> dict[str, Any]:
    """Decodes a map with string keys; anything else raises DecodeError."""
    value = decode(payload, encoding)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise DecodeError(f"expected a map with string keys, got {type(value).__name__}")
    return value
