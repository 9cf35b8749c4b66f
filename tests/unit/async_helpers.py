"""Helpers shared by the server unit tests that drive asyncio code from plain test functions."""

from __future__ import annotations

import asyncio
import time


def run(coro):
    """Run a coroutine to completion, failing the test after 30 s instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
