"""Supervision loops survive a failing tick: the error is logged and the next tick runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from muse.core.autoscaler import Autoscaler
from muse.periodic import every
from muse.pools.local import Pool

pytestmark = pytest.mark.anyio


def fails_once(then: Callable[[], None] = lambda: None) -> tuple[Callable[[], None], list[int]]:
    calls: list[int] = []

    def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        then()

    return tick, calls


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_every_logs_a_failing_tick_and_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    tick, calls = fails_once()
    log = logging.getLogger("muse.test.periodic")
    task = asyncio.create_task(every(0.01, tick, log=log, name="test loop"))
    try:
        await until(lambda: len(calls) >= 3)
    finally:
        task.cancel()
    failures = [r for r in caplog.records if r.name == "muse.test.periodic" and r.levelno == logging.ERROR]
    assert len(failures) == 1 and "test loop" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "injected failure" in str(failures[0].exc_info[1])


class Target:
    target = 0

    def reconcile(self) -> None:
        pass


async def test_the_autoscaler_loop_survives_a_failing_load_reading(caplog: pytest.LogCaptureFixture) -> None:
    readings = iter([RuntimeError("injected failure")])

    def load() -> int:
        reading = next(readings, 3)
        if isinstance(reading, Exception):
            raise reading
        return reading

    pool = Target()
    scaler = Autoscaler(pool, load, max_batch_size=2, min_workers=0, max_workers=2, interval=0.01)
    task = asyncio.create_task(scaler.run())
    try:
        await until(lambda: pool.target == 2)
    finally:
        task.cancel()
    assert any("autoscaler" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_the_pool_supervises_itself_and_survives_a_failing_tick(caplog: pytest.LogCaptureFixture) -> None:
    # Target 0: the pool's own timer runs without any worker or autoscaler.
    pool = Pool(model="unused", devices=["cpu"], worker_timeout=0.2)
    pool.target = 0
    tick, calls = fails_once()
    pool._kill_hung = tick  # type: ignore[method-assign]
    pool.start(listener=None)  # type: ignore[arg-type]
    try:
        await until(lambda: len(calls) >= 3)
    finally:
        await pool.close()
    assert any("pool supervisor" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
