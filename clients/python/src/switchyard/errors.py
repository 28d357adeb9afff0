"""Exceptions raised by the SDK, and the one an rpc handler raises on purpose.

Every exception the SDK raises is a :class:`SwitchyardError`. Tests and
callers match on classes and on ``code``, never on messages.
"""

from __future__ import annotations


class SwitchyardError(Exception):
    """Base class of every error this package raises."""


class ValidationError(SwitchyardError, ValueError):
    """An argument breaks a protocol rule; nothing was sent."""


class ApiError(SwitchyardError):
    """The application API answered ``{"error": {"code", "message"}}`` (or could not be reached).

    ``code`` is the protocol's error code (``bad_request``, ``unavailable``,
    ``internal``, and for ``subscribe``/``join`` the client op's codes such as
    ``invalid_filter``, ``too_many_subscriptions``, ``too_many_rooms``).
    ``retryable`` is true for ``unavailable``: every API method is idempotent,
    so retrying is safe.
    """

    retryable: bool = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    @staticmethod
    def from_reply(code: str, message: str) -> ApiError:
        """The most specific subclass for ``code`` (``ApiError`` itself for unknown codes)."""
        cls = _BY_CODE.get(code, ApiError)
        return cls(code, message)


class BadRequest(ApiError):
    """``bad_request``: a field is missing, of the wrong type, or breaks a naming rule."""


class Unavailable(ApiError):
    """``unavailable``: not done in time; safe to retry."""

    retryable = True


class ApiTimeout(Unavailable):
    """No reply within the request timeout (code ``unavailable``). Safe to retry."""


class NoResponders(Unavailable):
    """Nothing listens on the API subject: no router (or an older one without the API)."""


class InternalError(ApiError):
    """``internal``: a server-side failure (also used for a reply this SDK cannot read)."""


class InvalidFilter(ApiError):
    """``invalid_filter``: a name, value, bound or type breaks the subscription rules."""


class TooManySubscriptions(ApiError):
    """``too_many_subscriptions``: the user is at the subscription limit."""


class TooManyRooms(ApiError):
    """``too_many_rooms``: the user is at the room limit."""


_BY_CODE: dict[str, type[ApiError]] = {
    "bad_request": BadRequest,
    "unavailable": Unavailable,
    "internal": InternalError,
    "invalid_filter": InvalidFilter,
    "too_many_subscriptions": TooManySubscriptions,
    "too_many_rooms": TooManyRooms,
}


class RpcError(SwitchyardError):
    """Raised by an rpc handler to answer the client with an ``error`` frame.

    The client gets ``{"op":"error","code":code,"message":message}``, the code
    passed on as given (for example ``RpcError("out_of_stock", "no more AAPL")``).
    """

    def __init__(self, code: str, message: str = "") -> None:
        if not isinstance(code, str) or not code:
            raise ValidationError("RpcError code must be a non-empty string")
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
