"""Which kept jobs make room when the table is full: a pure rule over tickets, no server."""

from __future__ import annotations

import asyncio

import pytest

from muse.core.service import evictable
from muse.core.tickets import Ticket, TicketState
from muse.messages import GenerateRequest

pytestmark = pytest.mark.anyio


def ticket(job_id: str, owner: str, *, ended: bool) -> Ticket:
    request = GenerateRequest(prompt="p", seed=1, steps=1, guidance_scale=1.0, width=64, height=64)
    t = Ticket(job_id, request, asyncio.get_running_loop().create_future(), 0.0, 1.0, owner)
    if ended:
        t.end(TicketState.CANCELLED)
    return t


async def test_a_flooding_owner_evicts_its_own_ended_jobs_not_anothers() -> None:
    jobs = {"kept": ticket("kept", "alice", ended=True)}
    jobs |= {f"f{i}": ticket(f"f{i}", "mallory", ended=True) for i in range(5)}
    jobs["running"] = ticket("running", "mallory", ended=False)
    # alice's finished job is the oldest of all, yet mallory's oldest ended ones go.
    assert evictable(jobs, 2) == ["f0", "f1"]
    assert evictable(jobs, 0) == []


async def test_unfinished_jobs_are_never_evicted() -> None:
    jobs = {f"r{i}": ticket(f"r{i}", "a", ended=False) for i in range(3)}
    assert evictable(jobs, 1) == []
