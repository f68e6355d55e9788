"""The worker: load one pipeline on one device, then run the batches the parent sends.

`main` is a worker subprocess's entry point (started with the `spawn` context: a forked child hangs
once the parent's torch has used threads); `serve` is the engine behind any transport (a pipe, or the
queues of a Ray actor, muse.worker.channel). Loading, warm-up and every batch run on one thread: a
model loaded on one thread and run on another was measured 3.2x slower here, its OpenMP threads
fighting over the cores.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from muse.messages import (
    BOOT_FAILURE_EXIT,
    Assignment,
    Batching,
    BootFailure,
    Compiling,
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Result,
    Stop,
)
from muse.worker.channel import Channel, PipeChannel

if TYPE_CHECKING:
    from muse.worker.fastpath import FastPath

log = logging.getLogger("muse.worker")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: int
    model: str
    device: str
    threads: int
    heartbeat_interval: float
    log_level: str = "info"
    parent_pid: int = 0  # the server; the worker dies with it
    batching: str = "auto"  # auto | step | request (--batching)
    capacity: int = 8  # images a step worker runs at once (--max-batch-size)
    progress_interval: float = 0.1  # --progress-interval
    compile: bool = False  # --compile (muse.worker.fastpath)
    compile_mode: str = "default"  # --compile-mode
    compile_cache: str = ""  # --compile-cache
    gpu_memory_fraction: float = 0.9  # --gpu-memory-fraction
    dtype: str = "auto"  # --dtype
    quantize: str = "none"  # --quantize
    offload: str = "none"  # --offload
    lora_dir: str = ""  # --lora-dir
    lora_cache: int = 8  # --lora-cache


def heartbeat(channel: Channel, interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            channel.send(Heartbeat())
        except (OSError, ValueError):
            return  # the pipe is closed: the process is exiting


def serve_batch(channel: Channel, loaded: object, batch: Assignment) -> None:
    from muse.worker.pipeline import run_batch

    def on_step(step: int) -> bool:
        channel.send(Progress(batch.assignment_id, step, batch.key.steps))
        return not channel.drain_control(batch.assignment_id)

    start = time.perf_counter()
    try:
        pngs = run_batch(loaded, batch, on_step)  # type: ignore[arg-type]
    except Exception as exc:
        from muse.worker.loras import failure

        log.exception("batch %s failed", batch.assignment_id)
        channel.send(failure(batch.assignment_id, exc))
        return
    if pngs is None:
        channel.send(Failure(batch.assignment_id, "interrupted", interrupted=True))
    else:
        channel.send(Result(batch.assignment_id, pngs, (time.perf_counter() - start) * 1000))


def choose_batching(wanted: str, pipe: object) -> str:
    """The mode this worker runs (--batching): step where the engine knows the pipeline, unless told."""
    return batching_and_why(wanted, pipe)[0]


def batching_and_why(wanted: str, pipe: object) -> tuple[str, str]:
    """(mode, why) for --batching: step where the engine knows the pipeline, unless told otherwise."""
    from muse.worker.engine import supports
    from muse.worker.pipeline import LoadError

    if wanted == Batching.REQUEST:
        return Batching.REQUEST, "--batching request"
    if supports(pipe):
        return Batching.STEP, "the step engine knows it"
    if wanted == Batching.STEP:
        raise LoadError(
            f"--batching step: {type(pipe).__name__} does not run on the step engine; use --batching request or auto"
        )
    return Batching.REQUEST, "the step engine does not know it"


def check_compile(config: WorkerConfig, pipe: object) -> None:
    """--compile knows UNets (muse.worker.fastpath): refuse it, in one line, for any other denoiser."""
    from muse.worker.pipeline import LoadError

    if config.compile and getattr(pipe, "unet", None) is None:
        raise LoadError(
            f"--compile: {type(pipe).__name__} has no UNet (compiling its transformer is not supported); "
            "serve it without --compile"
        )


def take_loras(config: WorkerConfig, pipe: Any) -> Any:
    """--lora-dir: the adapters requests may name (muse.worker.loras), for a pipeline diffusers loads LoRAs into."""
    from muse.worker.loras import RowLoras
    from muse.worker.pipeline import LoadError

    if not hasattr(pipe, "load_lora_weights"):
        raise LoadError(f"--lora-dir: {type(pipe).__name__} cannot load LoRA adapters; serve it without --lora-dir")
    if config.compile:
        raise LoadError("--lora-dir with --compile: a compiled UNet would not see the adapters; choose one")
    if importlib.util.find_spec("peft") is None:
        raise LoadError("--lora-dir needs peft: pip install peft")
    return RowLoras(pipe, config.lora_dir, config.lora_cache)


def compile_pipeline(channel: Channel, config: WorkerConfig, loaded: Any, batching: str) -> FastPath | None:
    """--compile (muse.worker.fastpath): the compiled UNet and VAE decoder, and the step engine's row
    buckets. Whole-call workers stay eager: their batch sizes are not padded, and each new one would
    stall a compile."""
    from muse.worker.fastpath import FastPath, compile_decoder, optimize, row_buckets, use_compile_cache

    if batching != Batching.STEP:
        log.warning("--compile applies to step batching; this worker runs whole pipeline calls, eager")
        return None
    if config.compile_cache:
        use_compile_cache(config.compile_cache)
    mode = config.compile_mode
    fast = FastPath(optimize(loaded.pipe, mode), row_buckets(config.capacity), compile_decoder(loaded.pipe, mode))
    channel.send(Compiling(0, len(fast.buckets)))
    return fast


def warm(channel: Channel, config: WorkerConfig, loaded: Any, fast: FastPath) -> int:
    """Compile every bucket before Ready, saying how far; on CUDA, keep those within
    --gpu-memory-fraction (in `fast.buckets`). Returns the capacity they allow."""
    from muse.worker.engine import StepEngine
    from muse.worker.warmup import Memory, warm_buckets

    engine = StepEngine(loaded, fast.buckets, fast.unet, fast.decoder)
    memory = Memory(loaded.pipe.unet.device) if config.device.startswith("cuda") else None
    warmed = warm_buckets(
        engine,
        loaded.width,
        loaded.height,
        lambda done, total: channel.send(Compiling(done, total)),
        memory,
        config.gpu_memory_fraction,
    )
    fast.buckets = warmed.buckets
    if warmed.peak_bytes:
        log.info("peak GPU memory by UNet rows: %s", {k: f"{v / 2**30:.2f} GiB" for k, v in warmed.peak_bytes.items()})
    return min(config.capacity, warmed.capacity)


def ours(exc: BaseException) -> bool:
    """A LoadError: a reason said in one line, with no traceback worth showing."""
    pipeline = sys.modules.get("muse.worker.pipeline")  # where it is raised, so imported if it was
    return pipeline is not None and isinstance(exc, pipeline.LoadError)


def one_line(exc: BaseException) -> str:
    """A boot failure as /readyz shows it: our own reasons as they are, others as their type and first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    text = text if len(text) <= 300 else text[:297] + "..."
    return text if ours(exc) else f"{type(exc).__name__}: {text}"


def size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.1f} MiB"


def describe_precision(config: WorkerConfig, loaded: Any) -> str:
    """What the weights are: --dtype as resolved, --quantize and --offload where set."""
    parts = [str(getattr(loaded.pipe, "dtype", config.dtype)).removeprefix("torch.")]
    if config.quantize != "none":
        parts.append(f"{config.quantize} denoiser")
    if config.offload != "none":
        parts.append(f"{config.offload} CPU offload")
    return ", ".join(parts)


def setup_logging(config: WorkerConfig) -> None:
    """A worker's log lines name it and its process, in whatever process hosts it (subprocess or actor)."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s worker-{config.worker_id}[{os.getpid()}] %(levelname)s %(message)s",
    )
    quiet_libraries()


def quiet_libraries() -> None:
    """Library chatter (progress bars, optional-dependency hints) would flood the server log per worker."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchao (--quantize), imported by diffusers where installed, warns about kernels for other GPUs
    # and about torch's pytree registrations it makes.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this worker the moment its parent dies, even in the middle of a step
    that lasts minutes, so no orphan keeps a GPU or gigabytes of memory (elsewhere the worker notices the
    closed pipe between steps). The parent is the server, or for a CPU worker the server's forkserver
    (muse.pools.local), which exits as soon as the server is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid and parent_pid not in (os.getppid(), parent_of(os.getppid())):
        os._exit(1)  # the server died before prctl took effect


def parent_of(pid: int) -> int | None:
    """A process's parent on Linux (/proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def leave_forkserver() -> None:
    """A child of the server's forkserver (a CPU worker) holds, as each of them does, the end of a pipe
    whose closing tells the forkserver that the server is gone. Let go of it: else a killed server's
    forkserver, and so (PR_SET_PDEATHSIG) this worker, would live until the worker's step ends."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:  # None in a spawned worker, which never met a forkserver
        os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def main(conn: Connection, config: WorkerConfig) -> None:
    """A worker subprocess's entry point."""
    leave_forkserver()
    die_with_parent(config.parent_pid)
    # The parent decides when workers stop: Ctrl-C in a terminal, or a service manager signalling the
    # whole process group, must not kill a batch the parent is draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(config)
    sys.exit(serve(PipeChannel(conn, progress_every=config.progress_interval), config))


def serve(channel: Channel, config: WorkerConfig) -> int:
    """Load the pipeline, say Ready, then run what the parent sends until it says Stop or is gone.
    Returns the exit code (BOOT_FAILURE_EXIT when the model cannot load). Whatever hosts it (a
    subprocess, a Ray actor), loading and every step run on the calling thread."""
    try:
        import torch

        if config.threads > 0:
            torch.set_num_threads(config.threads)
        from muse.worker.heap import keep_freed_memory
        from muse.worker.pipeline import load_pipeline, warm_up

        keep_freed_memory()

        start = time.perf_counter()
        loaded = load_pipeline(
            config.model, config.device, dtype=config.dtype, quantize=config.quantize, offload=config.offload
        )
        batching, why = batching_and_why(config.batching, loaded.pipe)
        check_compile(config, loaded.pipe)
        if config.lora_dir:
            loaded.loras = take_loras(config, loaded.pipe)
        fast = compile_pipeline(channel, config, loaded, batching) if config.compile else None
        warm_up(loaded)
        capacity = warm(channel, config, loaded, fast) if fast else config.capacity
        load_s = time.perf_counter() - start
    except BaseException as exc:
        reason = f"cannot load model {config.model!r} on {config.device}: {one_line(exc)}"
        log.error("%s", reason, exc_info=not ours(exc))
        channel.send(BootFailure(reason))
        return BOOT_FAILURE_EXIT

    threading.Thread(target=heartbeat, args=(channel, config.heartbeat_interval), daemon=True).start()
    channel.send(
        Ready(
            config.model,
            config.device,
            loaded.width,
            loaded.height,
            loaded.guidance_scale,
            load_s,
            os.getpid(),
            batching,
            capacity,
            type(loaded.pipe).__name__,
            batching == Batching.STEP or loaded.reports_steps,
        )
    )
    log.info(
        "ready on %s in %.1f s: %s, %s batching (%s); %s; %s of weights per worker",
        config.device,
        load_s,
        type(loaded.pipe).__name__,
        "step" if batching == Batching.STEP else "whole-call",
        why,
        describe_precision(config, loaded),
        size(loaded.weight_bytes),
    )
    if batching == Batching.STEP:
        from muse.worker.steploop import run_steps

        run_steps(channel, loaded, capacity, fast)
        return 0
    while not channel.stop_requested:
        try:
            messages = channel.receive(block=True)
        except (EOFError, OSError):
            return 0  # the parent is gone
        for received in messages:
            if isinstance(received, Assignment):
                serve_batch(channel, loaded, received)
            elif isinstance(received, Stop):
                channel.stop_requested = True
            # A stale Interrupt (its batch already finished) needs nothing.
    return 0
