"""Workers keep the memory their steps free (muse.worker.heap): glibc's own thresholds handed a step worker's
activations back to the kernel at every step, and took them back as page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocates ten 3 MiB blocks, writes them, frees them, five times over; prints the page faults the last three
# rounds took. Plain glibc serves them from the heap after the first round, and trims the 30 MiB free at its top
# each time: the kernel zero-fills them again in the next round.
ROUNDS = """
import ctypes, sys
from muse.worker.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
block = 3 * 2**20
for round in range(5):
    if round == 2:
        start = faults()
    blocks = [libc.malloc(block) for _ in range(10)]
    for address in blocks:
        ctypes.memset(address, 1, block)
    for address in blocks:
        libc.free(address)
print(faults() - start)
"""


def faults_of_three_rounds(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only: others keep their own policy")
def test_freed_blocks_stay_in_the_process_instead_of_coming_back_as_page_faults() -> None:
    pages = 3 * 10 * 3 * 2**20 // 4096  # three rounds of 30 MiB
    # Plain glibc: every round's 30 MiB come back from the kernel.
    assert faults_of_three_rounds("plain") > pages // 2
    # Kept: the blocks are reused in place.
    assert faults_of_three_rounds("keep") < pages // 50
