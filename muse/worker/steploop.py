"""A step worker's loop: Assignments from the parent become slots of the step engine, joining and leaving the
running batch between denoising steps.

Each pass reads every waiting message (blocking only while there is nothing to run), admits waiting
Assignments of the running latent shape up to `capacity` images (their prompts encoded together, with those
of the Assignments waiting behind them; while slots run, no more than one UNet call's worth of text encoding
per boundary), runs one step over every slot, reports each Assignment's progress, and decodes the slots that
finished (together; under load, with those finishing a step or two later, where that is cheaper per image).
On an accelerator, the copy of decoded images to the host, their conversion to PIL images, PNG encoding and
the pipe write of a finished Assignment happen on a small thread, so the device's next step does not wait for
them. On a CPU they happen in line: the cores are all the denoiser's, and a thread that took one of them from
its OpenMP threads mid-step cost more than it saved (4 % of the saturated throughput, measured). An Interrupt
frees its Assignment's slots at the next boundary.

Runs on the worker's main thread, where the pipeline was loaded (see muse.worker.main).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from muse.averages import ewma
from muse.messages import Assignment, Failure, Interrupt, Progress, Result, StepKey, Steps, Stop
from muse.worker.channel import Channel
from muse.worker.engine import Decoded, Slot, SlotRequest, StepEngine
from muse.worker.families.base import Conditioning
from muse.worker.fastpath import FastPath
from muse.worker.loras import LoraError, RowLoras, failure
from muse.worker.pipeline import LoadedPipeline, encode_png

log = logging.getLogger("muse.worker")

# A finished image waits at most this many steps to be decoded with others (see StepLoop.hold).
HOLD_STEPS = 2
# Holding pays only where a decode of n images costs each of them at most this share of a lone decode: true of
# small latents on a CPU (the embedded model: 5.6 ms each in a pair, 4.7 in eight, against 8.3 alone), not of
# a 512-pixel VAE, whose decode grows with its images.
HOLD_GAIN = 0.8
# A worker whose decodes of several did not pay still holds one chance in this many, to measure again: the
# comparison rests on a few samples, and one taken in a slow moment must not settle it for good.
REMEASURE_EVERY = 16


@dataclass(eq=False)
class Running:
    """One Assignment (one request's images) while its slots run."""

    work: Assignment
    started: float = field(default_factory=time.perf_counter)
    pictures: list[tuple[Decoded, int] | None] = field(default_factory=list)  # each image: its decode and row
    reported: int = 0  # the last step sent as Progress
    shared: int = 0  # images in the UNet calls it took part in, summed
    steps_run: int = 0

    def __post_init__(self) -> None:
        self.pictures = [None] * len(self.work.images)

    @property
    def decoded(self) -> bool:
        return all(p is not None for p in self.pictures)


def slot_requests(work: Assignment) -> list[SlotRequest]:
    key = work.key
    return [
        SlotRequest(
            f"{work.assignment_id}/{i}",
            spec.prompt,
            spec.negative_prompt,
            spec.seed,
            key.steps,
            key.guidance_scale,
            key.width,
            key.height,
            key.scheduler,
            owner=work.assignment_id,
            index=i,
            source=spec.source,
            loras=spec.loras,
        )
        for i, spec in enumerate(work.images)
    ]


def owner_of(slot: Slot) -> tuple[str, int]:
    return slot.request.owner, slot.request.index


class StepLoop:
    def __init__(self, channel: Channel, loaded: LoadedPipeline, capacity: int, fast: FastPath | None = None) -> None:
        self.channel = channel
        self.loras: RowLoras | None = loaded.loras
        if fast:
            self.engine = StepEngine(loaded, fast.buckets, fast.unet, fast.decoder, loras=self.loras)
        else:
            self.engine = StepEngine(loaded, loras=self.loras)
        self.capacity = max(1, capacity)
        self.pending: deque[Assignment] = deque()
        self.running: dict[str, Running] = {}
        # Waiting Assignments' text, encoded in the same call as an earlier admission's (see encode_ahead).
        self.encoded: dict[str, list[Conditioning]] = {}
        # Finished images whose decode waits for others finishing a step or two later (see hold).
        self.held: list[Slot] = []
        self.held_since = 0  # the UNet call after which the oldest of them finished
        # A decode's running average cost by its images, in UNet calls (its seconds ÷ the step time then): the
        # machine's speed drifts by tens of percent within minutes here, and decodes of several are rare.
        self.decode_cost: dict[int, float] = {}
        self.declined = 0  # chances to hold declined because a decode of several did not pay
        # One thread, on an accelerator only: PNGs leave in the order their Assignments finished, and it never
        # competes for more than one core with the denoising.
        on_cpu = torch.device(self.engine.device).type == "cpu"
        self.encoder = None if on_cpu else ThreadPoolExecutor(1, thread_name_prefix="muse-png")
        self.unet_calls = 0
        # Running averages: seconds per UNet call and per admitted image (its text encoding and noise).
        self.step_s = 0.0
        self.admit_s = 0.0
        self.gap_s = 0.0  # between UNet calls while slots waited: what keeps the device idle under load
        # A GPU step returns once queued: waiting for it makes the step time, the admission time and the
        # gap between steps what the card saw (it costs the overlap of a millisecond or two of Python).
        device = self.engine.device
        self.finish_step = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
        self.last_call_end: float | None = None

    def run(self) -> None:
        try:
            while True:
                idle = not self.engine.slots and not self.pending
                if idle and self.channel.stop_requested:
                    return
                try:
                    messages = self.channel.receive(block=idle)
                except (EOFError, OSError):
                    return  # the parent is gone
                for message in messages:
                    self.handle(message)
                self.admit()
                if self.engine.slots:
                    self.step()
                elif self.pending and self.loras is not None:
                    self.loras.wait(0.05)  # nothing runs: wait for the LoRA a waiting request needs
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the PNGs on their way out (on an accelerator)."""
        if self.encoder is not None:
            self.encoder.shutdown(wait=True)

    def handle(self, message: object) -> None:
        if isinstance(message, Assignment):
            self.pending.append(message)
        elif isinstance(message, Interrupt):
            self.interrupt(message.assignment_id)
        elif isinstance(message, Stop):
            self.channel.stop_requested = True  # finish what runs, take nothing new, then exit

    def interrupt(self, assignment_id: str) -> None:
        waiting = [b for b in self.pending if b.assignment_id == assignment_id]
        run = self.running.pop(assignment_id, None)
        if not waiting and run is None:
            return  # already finished: its Result is on the way
        for work in waiting:
            self.pending.remove(work)
        self.forget(assignment_id)
        if run is not None:
            self.engine.remove(r.slot_id for r in slot_requests(run.work))
        self.channel.send(Failure(assignment_id, "interrupted", interrupted=True))

    # ---- joining ----------------------------------------------------------------------------------

    def admit(self) -> None:
        """Waiting Assignments of the running StepKey join, oldest first, while their images fit."""
        if not self.pending:
            return
        key = self.engine.step_key or self.pending[0].key.step_key
        room = self.capacity - len(self.engine.slots)
        budget = self.encoding_budget() if self.engine.slots else room
        joining: list[Assignment] = []
        for work in list(self.pending):
            if work.key.step_key != key:
                continue  # waits until the running key's images drain (the parent does not send it before)
            if not self.loras_ready(work):
                continue  # its adapter is being read (running images go on stepping), or it failed
            n = len(work.images)
            # An empty engine takes an Assignment bigger than its capacity, or it could never run; a running
            # one takes the first Assignment that fits, however long its prompts take to encode.
            if n > (min(room, budget) if joining else room) and (self.engine.slots or joining):
                break
            joining.append(work)
            self.pending.remove(work)
            room -= n
            budget -= n
        if not joining:
            return
        started = time.perf_counter()  # a request's compute time counts its text encoding too
        encoded, riders = self.encode_ahead(joining, key, budget)

        def given(work: Assignment) -> list[Conditioning | None]:
            none: list[Conditioning | None] = [None] * len(work.images)
            return [*encoded[work.assignment_id]] if work.assignment_id in encoded else none

        try:
            requests = [r for b in joining for r in slot_requests(b)]
            self.engine.admit(requests, [c for b in joining for c in given(b)])
            self.admit_s = ewma(self.admit_s, (time.perf_counter() - started) / (len(requests) + riders))
        except Exception as exc:
            if len(joining) == 1:
                self.fail(joining[0].assignment_id, exc)
                return
            # Find the Assignment at fault: each one alone.
            for work in joining:
                try:
                    self.engine.admit(slot_requests(work), given(work))
                except Exception as alone:
                    self.fail(work.assignment_id, alone)
                    continue
                self.running[work.assignment_id] = Running(work, started)
            return
        for work in joining:
            self.running[work.assignment_id] = Running(work, started)

    def encode_ahead(
        self, joining: list[Assignment], key: StepKey, spare: int
    ) -> tuple[dict[str, list[Conditioning]], int]:
        """The joining Assignments' conditioning where it was made earlier; when some must be encoded now, the
        Assignments waiting behind them (same StepKey, no LoRAs; up to `spare` images, what is left of the
        boundary's encoding budget, and the capacity in all) are encoded in the same text-encoder call and kept
        for their own admission: under load images join one at a time, and one call for two costs little more
        than one (1.5 against 1.15 ms on the embedded model). Returns it, and the waiting images encoded now."""
        ready = {w.assignment_id: self.encoded.pop(w.assignment_id) for w in joining if w.assignment_id in self.encoded}
        needed = [w for w in joining if w.assignment_id not in ready]
        room = min(spare, self.capacity - sum(len(w.images) for w in needed))
        riders: list[Assignment] = []
        for work in self.pending if needed else ():
            if work.key.step_key != key or work.assignment_id in self.encoded or any(i.loras for i in work.images):
                continue
            if len(work.images) > room:
                break
            riders.append(work)
            room -= len(work.images)
        if not riders:
            return ready, 0
        batch = needed + riders
        try:
            conditioning = iter(self.engine.encode([r for w in batch for r in slot_requests(w)]))
        except Exception:
            # Each is encoded again at its own admission, where a failure is its own alone.
            log.debug("encoding ahead failed", exc_info=True)
            return ready, 0
        kept = {w.assignment_id for w in riders}  # by id: Assignments compare by value, images and all
        for work in batch:
            made = [next(conditioning) for _ in work.images]
            (self.encoded if work.assignment_id in kept else ready)[work.assignment_id] = made
        return ready, sum(len(w.images) for w in riders)

    def loras_ready(self, work: Assignment) -> bool:
        """Whether the LoRAs an Assignment names are loaded (reading them if not); one that cannot be is the
        Assignment's failure."""
        uses = {use for spec in work.images for use in spec.loras}
        if not uses:
            return True
        try:
            if self.loras is None:
                raise LoraError("loras: this server has no LoRA folder (--lora-dir)")
            if not self.loras.ready(uses):
                return False
            self.loras.evict(self.loras_in_use() | {use.name for use in uses})
            return True
        except LoraError as exc:
            self.pending.remove(work)
            self.fail(work.assignment_id, exc)
            return False

    def loras_in_use(self) -> set[str]:
        return {use.name for slot in self.engine.slots for use in slot.request.loras}

    def encoding_budget(self) -> int:
        """Images whose admission takes no longer than one UNet call: every running image waits for it."""
        if not self.step_s or not self.admit_s:
            return self.capacity
        return max(1, int(self.step_s / self.admit_s))

    # ---- stepping ---------------------------------------------------------------------------------

    def step(self) -> None:
        occupancy = len(self.engine.slots)
        started = time.perf_counter()
        if self.last_call_end is not None:
            self.gap_s += started - self.last_call_end
        try:
            finished = self.engine.step()
            if self.finish_step is not None:
                self.finish_step(self.engine.device)
        except Exception as exc:
            self.last_call_end = None
            # One step serves every slot: none of them can go on.
            self.engine.remove(s.request.slot_id for s in list(self.engine.slots))
            for assignment_id in list(self.running):
                self.fail(assignment_id, exc)
            return
        self.unet_calls += 1
        ended = time.perf_counter()
        self.step_s = ewma(self.step_s, ended - started)
        for run in self.running.values():
            run.shared += occupancy
            run.steps_run += 1
        self.report_progress(finished)
        if finished and not self.held:
            self.held_since = self.unet_calls
        self.held.extend(finished)
        if self.held and not self.hold():
            slots, self.held = self.held, []
            self.finish(slots)
        # The gap counts only while the engine has work left; an engine that emptied waits for requests.
        self.last_call_end = ended if self.engine.slots else None

    def hold(self) -> bool:
        """Whether the finished images wait to be decoded with images finishing at most HOLD_STEPS after the
        oldest of them: only while every slot is in use or about to be refilled from the images waiting (the
        decode's cost is then everyone's capacity; a finished image's slot is refilled at once, only its Result
        waits), and only where a decode of several was measured cheaper per image (HOLD_GAIN). A worker with
        free slots, or stopping, decodes at once."""
        busy = len(self.engine.slots) + len(self.pending) >= self.capacity  # every slot in use, or refilled next
        if not busy or self.channel.stop_requested or len(self.held) >= self.capacity:
            return False
        left = HOLD_STEPS - (self.unet_calls - self.held_since)
        soon = any(len(s.timesteps) - s.index <= left for s in self.engine.slots)
        return soon and self.grouping_pays()

    def grouping_pays(self) -> bool:
        """Whether the largest decode measured cost each image at most HOLD_GAIN of a lone one. Before any
        decode of several was measured, and once in REMEASURE_EVERY chances after, yes: the hold measures it
        (images that start one at a time may never finish together otherwise)."""
        one = self.decode_cost.get(1)
        n = max(self.decode_cost, default=1)
        if one is None:
            return False
        if n == 1 or self.decode_cost[n] / n <= HOLD_GAIN * one:
            return True
        self.declined += 1
        return self.declined % REMEASURE_EVERY == 0

    def report_progress(self, finished: list[Slot]) -> None:
        moved: list[Progress] = []
        seen: set[str] = set()
        for slot in [*finished, *self.engine.slots]:
            assignment_id, _ = owner_of(slot)
            run = self.running.get(assignment_id)
            if run is None or assignment_id in seen:
                continue
            seen.add(assignment_id)
            done, steps = slot.progress
            if done != run.reported:
                run.reported = done
                moved.append(Progress(assignment_id, done, steps))
        if moved:
            self.channel.send(Steps(moved, self.unet_calls, self.gap_s))

    def finish(self, slots: list[Slot]) -> None:
        slots = [s for s in slots if owner_of(s)[0] in self.running]  # not those interrupted while held
        if not slots:
            return
        started = time.perf_counter()
        try:
            decoded = self.engine.decode_start(slots)
            # Timed where it runs in line: on a CUDA card timing it would wait for the card, which the next step
            # need not do; a card's decodes are never held (a full-size VAE's cost grows with its images).
            if self.finish_step is None and self.step_s:
                cost = (time.perf_counter() - started) / self.step_s
                self.decode_cost[len(slots)] = ewma(self.decode_cost.get(len(slots), 0.0), cost)
        except Exception as exc:
            for assignment_id in dict.fromkeys(owner_of(s)[0] for s in slots):  # in finishing order
                self.fail(assignment_id, exc)
            return
        for row, slot in enumerate(slots):
            assignment_id, index = owner_of(slot)
            run = self.running.get(assignment_id)
            if run is not None:
                run.pictures[index] = (decoded, row)
        for assignment_id in dict.fromkeys(owner_of(s)[0] for s in slots):  # in finishing order
            run = self.running.get(assignment_id)
            if run is not None and run.decoded:
                del self.running[assignment_id]
                if self.encoder is None:
                    self.deliver(run)
                else:
                    self.encoder.submit(self.deliver, run)

    def deliver(self, run: Running) -> None:
        try:
            pngs = [encode_png(decoded.picture(row)) for decoded, row in filter(None, run.pictures)]
            elapsed_ms = (time.perf_counter() - run.started) * 1000
            occupancy = run.shared / run.steps_run if run.steps_run else float(len(pngs))
            self.channel.send(Result(run.work.assignment_id, pngs, elapsed_ms, occupancy))
        except Exception as exc:
            self.fail(run.work.assignment_id, exc)

    def forget(self, assignment_id: str) -> None:
        """Drop what was made ahead for an Assignment: its encoded text, its finished images held."""
        self.encoded.pop(assignment_id, None)
        self.held = [s for s in self.held if owner_of(s)[0] != assignment_id]

    def fail(self, assignment_id: str, exc: BaseException) -> None:
        self.running.pop(assignment_id, None)
        self.forget(assignment_id)
        log.error("assignment %s failed", assignment_id, exc_info=exc)
        self.channel.send(failure(assignment_id, exc))


def run_steps(channel: Channel, loaded: LoadedPipeline, capacity: int, fast: FastPath | None) -> None:
    StepLoop(channel, loaded, capacity, fast).run()
