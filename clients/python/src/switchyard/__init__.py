"""Switchyard SDK for application back ends.

Publish events to a Switchyard fleet, serve the clients' ``rpc`` calls and
the router's authorization hook, and manage users, connections and
subscriptions through the application API, all over NATS (nats-py).

Layout:

- ``client``: :class:`Switchyard`, the connection and everything that talks to NATS.
- ``events``: targets and the producer envelope (pure).
- ``api``: application API requests and typed results (pure).
- ``handlers``: rpc and authorization requests and replies (pure).
- ``rules``: the protocol's naming rules.
- ``errors``: exceptions.
"""

from .api import Listing, PresenceEvent, RoomPresence, Stats, Subscription
from .client import DEFAULT_QUEUE, PresenceEvents, PublishAck, Switchyard
from .errors import (
    ApiError,
    ApiTimeout,
    BadRequest,
    InternalError,
    InvalidFilter,
    NoResponders,
    RpcError,
    SwitchyardError,
    TooManyRooms,
    TooManySubscriptions,
    Unavailable,
    ValidationError,
)
from .events import Priority, Target, to_all, to_match, to_room, to_users
from .handlers import JoinRequest, RpcRequest, SubscribeRequest

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_QUEUE",
    "ApiError",
    "ApiTimeout",
    "BadRequest",
    "InternalError",
    "InvalidFilter",
    "JoinRequest",
    "Listing",
    "NoResponders",
    "PresenceEvent",
    "PresenceEvents",
    "Priority",
    "PublishAck",
    "RoomPresence",
    "RpcError",
    "RpcRequest",
    "Stats",
    "SubscribeRequest",
    "Subscription",
    "Switchyard",
    "SwitchyardError",
    "Target",
    "TooManyRooms",
    "TooManySubscriptions",
    "Unavailable",
    "ValidationError",
    "to_all",
    "to_match",
    "to_room",
    "to_users",
]
