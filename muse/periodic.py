"""`every`: run a tick on a timer for as long as the task lives, surviving a failing tick.

Supervision loops (the pool's, the autoscaler's) must not die of one bad tick: an exception is logged
with its traceback and the next tick runs on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable


async def every(
    interval: float,
    tick: Callable[[], None],
    *,
    log: logging.Logger,
    name: str,
    wake: asyncio.Event | None = None,
) -> None:
    """Call `tick` now and then every `interval` seconds, or sooner whenever `wake` is set."""
    while True:
        try:
            tick()
        except Exception:
            log.exception("%s: one tick failed; the loop carries on", name)
        if wake is None:
            await asyncio.sleep(interval)
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
