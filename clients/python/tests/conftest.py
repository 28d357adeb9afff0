from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from switchyard import NoResponders, Switchyard

from .fleet import Fleet

PUBLIC_TYPES = "tick,news,pattern,note,alert"
"""Every type the tests use except ``premium``, which goes to the subscribe hook."""


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    f = Fleet(
        router_env={
            "SWITCHYARD_AUTHZ_REQUEST": "true",
            "SWITCHYARD_PUBLIC_TYPES": PUBLIC_TYPES,
        }
    )
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
async def sy(fleet: Fleet) -> AsyncIterator[Switchyard]:
    client = await Switchyard.connect(fleet.nats_url, timeout=5.0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def api_sy(sy: Switchyard) -> Switchyard:
    """``sy``, when the binaries answer the application API (protocol 1.1 section 3).

    Skipped when nothing answers on ``sy.api.stats`` (binaries from before the
    API), unless SWITCHYARD_REQUIRE_API=1 makes that a failure.
    """
    try:
        await sy.stats()
    except NoResponders:
        if os.environ.get("SWITCHYARD_REQUIRE_API") == "1":
            raise
        pytest.skip("the router/edge binaries do not answer the application API (sy.api.*) yet")
    return sy
