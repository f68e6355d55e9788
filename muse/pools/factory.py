"""Builds the pool the settings ask for (local subprocesses or Ray actors), with its worker range.

The composition root (muse.app) calls this and hands the pool to the service, which then reads it only
through the Protocol in muse.core.pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muse.config import Settings, check_backends
from muse.pools.base import BasePool


def devices_of(settings: Settings) -> list[str]:
    """Local: one worker per --devices entry. Ray: --devices names their kinds (cycled), --max-workers how
    many (default: one per entry)."""
    if settings.pool != "ray":
        return settings.device_list()
    kinds = ["auto"] if settings.devices.strip() == "auto" else settings.device_list()
    count = settings.max_workers or len(kinds)
    return [kinds[i % len(kinds)] for i in range(count)]


def worker_range(settings: Settings, devices: int) -> tuple[int, int]:
    """(min, max) workers: --max-workers up to one per device; --min-workers -1 means all of them."""
    most = min(settings.max_workers or devices, devices)
    least = most if settings.min_workers < 0 else min(settings.min_workers, most)
    return least, most


def build_pool(settings: Settings) -> BasePool:
    """The pool, its target at --min-workers; nothing starts before `pool.start()`. ValueError (naming the
    flag) for --quantize, --offload or --compile choices that no worker could load."""
    check_backends(settings)
    devices = devices_of(settings)
    common: dict[str, Any] = {
        "model": settings.model,
        "devices": devices,
        "worker_timeout": settings.worker_timeout,
        "log_level": settings.log_level,
        "batching": settings.batching,
        "max_batch_size": settings.max_batch_size,
        "worker_options": {
            "progress_interval": settings.progress_interval,
            "compile": settings.compile,
            "compile_mode": settings.compile_mode,
            "gpu_memory_fraction": settings.gpu_memory_fraction,
            "compile_cache": settings.compile_cache or str(Path(settings.data_dir) / "compile-cache"),
            "dtype": settings.dtype,
            "quantize": settings.quantize,
            "offload": settings.offload,
            "lora_dir": str(Path(settings.lora_dir).resolve()) if settings.lora_dir else "",
            "lora_cache": settings.lora_cache,
        },
    }
    pool: BasePool
    if settings.pool == "ray":
        from muse.pools.ray import RayPool

        pool = RayPool(address=settings.ray_address, cpus_per_worker=float(settings.threads_per_worker or 1), **common)
    else:
        from muse.pools.local import Pool

        pool = Pool(threads_per_worker=settings.threads_per_worker, **common)
    pool.target = worker_range(settings, len(devices))[0]
    return pool
