"""`keep_freed_memory`: a denoising process keeps the memory its steps free, instead of handing it back to the
kernel and taking page faults to get it again at the next step.

glibc's malloc gives the pages at the top of its heap back to the kernel whenever more than its trim threshold
lies free there, and serves each allocation above its mmap threshold with fresh pages of its own. Both
thresholds start at 128 KiB and only grow with the sizes a process happens to free early on. A step worker's
activations, of every size from kilobytes to megabytes as images join and leave, then came back from the kernel
at every step, zero-filled: 13,000 page faults per image on the embedded model (50 MB), 14 % of the worker's
CPU in the kernel (unmapping interrupts the other OpenMP thread too, to flush its TLB), 0.83 x the direct
loop's throughput against 0.92 x after (README, Performance). A whole-call worker whose history had raised its
thresholds took 850 per image. Fixed thresholds make it a few, whatever the history.

What it costs: up to TRIM_THRESHOLD of freed memory stays in the process after its largest batch (a worker's
resident size is its peak, less that). Allocations above MMAP_THRESHOLD (glibc's largest) still get fresh pages
each time: a tensor that large is worth many times its page faults in compute.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("muse.worker")

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Fix glibc malloc's thresholds for this process (see the module). False where the C library is not
    glibc (musl, macOS: nothing to do, or no `mallopt`) or refuses them."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.warning("malloc kept its own thresholds: freed memory may return to the kernel between steps")
    return done
