"""LoRA adapters per request, several different ones in one model call.

Adapters are loaded into the pipeline as diffusers loads them (its readers of diffusers/PEFT, kohya/A1111 and
FLUX trainers' key layouts, its PEFT layers in the UNet or transformer and the CLIP text encoders: see
`load_adapter`), never merged into the weights. Every PEFT LoRA layer of the pipeline then
computes its base output plus, for each group of rows that asked for an adapter, that adapter's delta at the
row's own scale (the technique of PEFT's mixed-adapter batches, with a scale per row): images with different
adapters, or none, share each denoiser call and each text encoding. The rows of the next call are a `Plan`,
set around the call; no plan, no adapter.

Adapter files are read on a side thread (their bytes are most of a load) while the step loop goes on; the
read weights are put into the model between steps. At most `cache` adapters stay loaded, least recently used
first out, never one that a running image uses.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muse.messages import Failure, LoraUse

log = logging.getLogger(__name__)


class LoraError(Exception):
    """An adapter that cannot be used here (missing, unreadable, for another architecture): the request's fault."""


@dataclass(frozen=True)
class Plan:
    """Which rows of the next model call take which adapter at which scale: `rows` in the call, and per group
    the adapter, its scale, and its rows (None: every row)."""

    rows: int | None
    groups: tuple[tuple[str, float, torch.Tensor | None], ...]

    @classmethod
    def of(cls, per_row: Sequence[Sequence[tuple[str, float]]], rows: int, device: Any) -> Plan | None:
        """`per_row[i]`: the (adapter, scale) pairs of row i; rows past `per_row` (padding) take none."""
        grouped: dict[tuple[str, float], list[int]] = {}
        for row, uses in enumerate(per_row):
            for use in uses:
                grouped.setdefault(use, []).append(row)
        if not grouped:
            return None
        # A group that covers every row adds its delta to the whole output: no gather, no scatter.
        groups = tuple(
            (name, scale, None if len(indices) == rows else torch.tensor(indices, dtype=torch.long, device=device))
            for (name, scale), indices in grouped.items()
        )
        return cls(rows, groups)

    @classmethod
    def every_row(cls, uses: Iterable[tuple[str, float]]) -> Plan | None:
        groups = tuple((name, scale, None) for name, scale in uses)
        return cls(None, groups) if groups else None


@dataclass(frozen=True)
class AdapterFile:
    """A LoRA file as read: its tensors, and the adapter settings diffusers' trainers write in its header
    (`lora_adapter_metadata`: rank and alpha per component, which the tensors alone do not say)."""

    weights: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path) -> AdapterFile:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:  # one read of the file: its header and tensors
            header = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        raw = header.get(METADATA_KEY)
        try:
            metadata = json.loads(raw) if raw else None
        except ValueError:
            raise ValueError(f"its {METADATA_KEY} header is not JSON") from None
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"its {METADATA_KEY} header is not a JSON object")
        return cls(weights, metadata)


@dataclass
class Loaded:
    adapter: str  # its name inside the model
    stamp: tuple[int, int]  # the file's (mtime_ns, size) when read: a changed file is a new adapter


class RowLoras:
    def __init__(self, pipe: Any, folder: str, cache: int) -> None:
        self.pipe = pipe
        self.folder = Path(folder)
        self.cache = max(1, cache)
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # by request name, least recently used first
        self.reads: dict[str, tuple[tuple[int, int], Future[AdapterFile]]] = {}
        self.failed: dict[str, tuple[tuple[int, int], str]] = {}
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="muse-lora")
        self.plan: Plan | None = None
        self._count = 0

    # ---- which adapters are ready -------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def stamp(self, name: str) -> tuple[int, int]:
        try:
            stat = self.path(name).stat()
        except OSError:
            raise LoraError(f"loras: no LoRA named {name!r} in the LoRA folder (was it deleted?)") from None
        return stat.st_mtime_ns, stat.st_size

    def ready(self, uses: Iterable[LoraUse]) -> bool:
        """Whether every adapter is loaded; starts reading those that are not. LoraError for one that cannot
        be (its read or its load failed)."""
        done = True
        for use in uses:
            if not self._ready(use.name):
                done = False
        return done

    def _ready(self, name: str) -> bool:
        known = self.loaded.get(name)
        stamp = self.stamp(name) if known is None else known.stamp
        if known is not None:
            self.loaded.move_to_end(name)
            return True
        failed = self.failed.get(name)
        if failed is not None and failed[0] == stamp:
            raise LoraError(failed[1])
        read = self.reads.get(name)
        if read is None or read[0] != stamp:
            self.reads[name] = (stamp, self.reader.submit(self._read, name))
            return False
        if not read[1].done():
            return False
        del self.reads[name]
        try:
            self._install(name, stamp, read[1].result())  # a read's failure too
        except Exception as exc:
            message = f"loras: {name!r} cannot be used with this model ({type(exc).__name__}: {first_line(exc)})"
            self.failed[name] = (stamp, message)
            raise LoraError(message) from exc
        return True

    def wait(self, timeout: float) -> None:
        """Block until a read finishes or `timeout` passes: a step loop with nothing else to do waits here."""
        pending = [future for _, future in self.reads.values() if not future.done()]
        if pending:
            futures.wait(pending, timeout, return_when=futures.FIRST_COMPLETED)  # a failed read is _ready's to say

    def load_now(self, uses: Iterable[LoraUse]) -> None:
        """Every adapter loaded before returning (whole pipeline calls have no steps to overlap a read with)."""
        uses = list(uses)
        while not self.ready(uses):
            self.wait(60.0)

    def _read(self, name: str) -> AdapterFile:
        return AdapterFile.read(self.path(name))

    def _install(self, name: str, stamp: tuple[int, int], file: AdapterFile) -> None:
        self._count += 1
        adapter = f"muse_{self._count}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"[:64]
        try:
            with warnings.catch_warnings():
                # PEFT warns of a second adapter in one model: several side by side is the point, rows pick
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # ...and of keys that fit no layer, which load_adapter counts and refuses with a plainer message.
                warnings.filterwarnings("ignore", message="While injecting the PEFT adapters, an inconsistency")
                load_adapter(self.pipe, file, adapter)
        except Exception:
            remove_adapter(self.pipe, adapter)  # whatever part of it went in
            raise
        self.loaded[name] = Loaded(adapter, stamp)
        wrap_layers(self.pipe, self)
        log.info("LoRA %s loaded (%d in memory)", name, len(self.loaded))

    def evict(self, in_use: set[str]) -> None:
        """Unload the least recently used adapters beyond the cache's size that no image uses."""
        for name in list(self.loaded):
            if len(self.loaded) <= self.cache:
                return
            if name in in_use:
                continue
            remove_adapter(self.pipe, self.loaded.pop(name).adapter)
            log.info("LoRA %s unloaded (%d in memory)", name, len(self.loaded))

    # ---- the rows of a call -------------------------------------------------------------------------

    def adapters(self, uses: Iterable[LoraUse]) -> tuple[tuple[str, float], ...]:
        """The model's adapter names and scales for a request's LoRAs (all loaded)."""
        return tuple((self.loaded[use.name].adapter, use.scale) for use in uses)

    @contextlib.contextmanager
    def rows(self, plan: Plan | None) -> Iterator[None]:
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None


# A LoRA layer's down-projection, in each key layout diffusers' readers return (one per adapted layer): PEFT's
# `lora_A`, diffusers' `lora.down`, old attention processors' `to_q_lora.down`, kohya's `lora_down`.
DOWN = re.compile(r"(\.lora_A|[._]lora[._]down)\.weight$")
CLIP_ENCODERS = ("text_encoder", "text_encoder_2")  # SD's, SDXL's two, FLUX's first, SD3's first two
T5_ENCODERS = ("text_encoder_2", "text_encoder_3")  # FLUX's second, SD3's third: diffusers loads no LoRA there
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def load_adapter(pipe: Any, file: AdapterFile, adapter: str) -> None:
    """Put a LoRA file's weights into the pipeline as `adapter`: diffusers converts its key layout (diffusers,
    PEFT, kohya/A1111, and FLUX's trainers' where its loader knows them) and loads its denoiser part (a UNet or
    a transformer); its CLIP text encoders' parts go in through PEFT itself, as diffusers' own text-encoder path
    does (that path asks transformers for a newer PEFT than may be installed). A file for another architecture
    fails here: missing modules or mismatched shapes."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state, alphas = lora_state(pipe, file.weights)
    if not state or not all("lora" in key for key in state):
        # FLUX Control LoRAs also replace norm layers and widen the input: not a delta a row can opt out of.
        raise ValueError("not a LoRA file (its tensors are not all named as LoRA layers)")
    if any("lora_magnitude_vector" in key or "dora_scale" in key for key in state):
        raise ValueError("a DoRA adapter (its magnitude vectors): only plain LoRA deltas are served per row")
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    encoders = [e for e in CLIP_ENCODERS if type(getattr(pipe, e, None)).__name__.startswith("CLIPTextModel")]
    t5 = [e for e in T5_ENCODERS if e not in encoders and getattr(pipe, e, None) is not None]
    owners = {key.split(".", 1)[0] for key in state}
    if not owners & {name, "unet", "transformer", *CLIP_ENCODERS, *T5_ENCODERS}:
        # A trainer that saved the denoiser's layers alone often leaves out whose they are.
        state = {f"{name}.{key}": value for key, value in state.items()}
        alphas = {f"{name}.{key}": value for key, value in alphas.items()} if alphas else alphas
        owners = {name}
    if ignored := sorted(owners & set(t5)):
        # As diffusers' loaders do: a T5 encoder takes no LoRA there, and the file's other parts still apply.
        log.warning("LoRA %s: its %s (T5) layers are left out, as diffusers leaves them", adapter, ignored)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in ignored}
        owners -= set(ignored)
    # An SD LoRA's UNet part in a FLUX pipeline would otherwise be dropped and its text part used alone.
    if foreign := sorted(owners - {name, *encoders}):
        raise ValueError(f"its {', '.join(foreign)} layers have no place in a {type(pipe).__name__}")
    denoiser_part = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
    if denoiser_part:
        denoiser = getattr(pipe, name)
        # The header's rank and alpha, where a trainer wrote them, stand instead of the alphas in the tensors
        # (diffusers takes the denoiser's own entries from the whole header by their prefix).
        settings = part_of(file.metadata, name)
        denoiser.load_lora_adapter(
            denoiser_part,
            prefix=name,
            network_alphas=None if settings else alphas,
            metadata=file.metadata if settings else None,
            adapter_name=adapter,
            _pipeline=pipe,
        )
        # diffusers only warns of layers the model lacks: a LoRA for another model of the same family must fail.
        wanted = sum(1 for key in denoiser_part if DOWN.search(key))
        placed = sum(1 for m in denoiser.modules() if adapter in getattr(m, "lora_A", {}))
        if placed < wanted:
            raise ValueError(f"{wanted - placed} of its {wanted} {name} layers fit no layer of this model")
    for encoder_name in encoders:
        encoder = getattr(pipe, encoder_name)
        prefix = f"{encoder_name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not hasattr(encoder, "text_model"):  # CLIPTextModel is flat in newer transformers
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        ranks = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
        settings = part_of(file.metadata, encoder_name)
        own_alphas = part_of(alphas, encoder_name) if not settings else None
        config = _create_lora_config(part, own_alphas, settings, ranks, is_unet=False)
        inject_adapter_in_model(config, encoder, adapter_name=adapter)
        result = set_peft_model_state_dict(encoder, part, adapter_name=adapter)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter in k or "lora" in k]
        if unexpected:
            raise ValueError(f"{len(unexpected)} of its {encoder_name} tensors fit no layer, e.g. {unexpected[0]}")


def part_of(values: dict[str, Any] | None, component: str) -> dict[str, Any] | None:
    """The entries of one component (`text_encoder.` keys for `text_encoder`), without its prefix; None if none."""
    if not values:
        return None
    prefix = f"{component}."
    part = {key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}
    return part or None


def lora_state(pipe: Any, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's tensors as diffusers names them for this pipeline, and their alphas where the layout keeps
    them apart: SD's loader returns both, FLUX's when asked, SD3's only the tensors. A UNet's config lets
    SD's and SDXL's readers place kohya files that name blocks as the original SGM code does."""
    accepts = inspect.signature(pipe.lora_state_dict).parameters
    extra: dict[str, Any] = {}
    if "return_alphas" in accepts:
        extra["return_alphas"] = True
    if getattr(pipe, "unet", None) is not None:
        extra["unet_config"] = pipe.unet.config
    read = pipe.lora_state_dict(dict(weights), **extra)
    if isinstance(read, tuple):
        return read[0], read[1]
    return read, None


def remove_adapter(pipe: Any, adapter: str) -> None:
    """Take an adapter out of every component, layer by layer: diffusers' `delete_adapters` wants one every
    component knows (a load that failed half way, the text encoder after the transformer, left its layers in some
    components only, where every later call would carry them), and leaves a CLIP encoder's config entry behind
    when PEFT, not diffusers, put the adapter there."""
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        layer: Any  # a PEFT tuner layer: its methods are not nn.Module's
        for layer in component.modules():
            if adapter in getattr(layer, "lora_A", {}):
                with warnings.catch_warnings():
                    # PEFT says which adapter is "active" now: rows pick theirs here, none is.
                    warnings.simplefilter("ignore")
                    layer.delete_adapter(adapter)
        configs = getattr(component, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter, None)


def wrap_layers(pipe: Any, owner: RowLoras) -> None:
    """Every PEFT LoRA layer of the pipeline's modules computes with `owner.plan` (those wrapped before stay)."""
    from peft.tuners.lora import LoraLayer

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_muse_rows", False):
                module.forward = types.MethodType(_row_forward, module)
                setattr(module, "_muse_rows", owner)  # noqa: B010 (a module attribute mypy cannot see)


def _row_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The base layer's output plus each planned adapter's delta on its rows, at its row's scale."""
    result = self.base_layer(x, *args, **kwargs)
    plan: Plan | None = self._muse_rows.plan
    if plan is None:
        return result
    if plan.rows is not None and x.shape[0] != plan.rows:
        raise RuntimeError(f"LoRA layer {type(self.base_layer).__name__} saw {x.shape[0]} rows, not {plan.rows}")
    stacked = _stacked(self, plan)
    if stacked is not None:
        down, weights, up = stacked
        part = x if x.dtype == down.dtype else x.to(down.dtype)
        hidden = torch.nn.functional.linear(part, down)
        hidden = hidden.mul_(weights.view(weights.shape[0], *([1] * (hidden.dim() - 2)), weights.shape[1]))
        delta = torch.nn.functional.linear(hidden, up)
        return result.add_(delta if delta.dtype == result.dtype else delta.to(result.dtype))
    for adapter, scale, rows in plan.groups:
        if adapter not in self.lora_A:
            continue  # this adapter does not touch this layer
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        part = x if rows is None else x.index_select(0, rows)
        if part.dtype != lora_a.weight.dtype:
            part = part.to(lora_a.weight.dtype)
        # No dropout: serving is inference, where PEFT's dropout is the identity.
        delta = lora_b(lora_a(part)).mul_(self.scaling[adapter] * scale)
        if delta.dtype != result.dtype:
            delta = delta.to(result.dtype)
        result = result.add_(delta) if rows is None else result.index_add_(0, rows, delta)
    return result


def _stacked(layer: Any, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For a linear layer and a plan that splits the rows among adapters: every adapter's down-projection
    stacked (r1 + r2 + … ranks), each call row's weight on each stacked rank (its adapters' scales there, 0
    elsewhere) and the up-projections side by side. Two matmuls then give every row its own adapters' deltas:
    ranks are small, so computing all of them for every row costs less than a gather, two small matmuls and a
    scatter per adapter (a quarter of a step, measured with four adapters in eight images). Kept on the layer
    while the plan lasts (a batch's plan lasts until a slot joins or leaves)."""
    cached = getattr(layer, "_muse_stacked", None)
    if cached is not None and cached[0] is plan:
        return cached[1]
    groups = [(adapter, scale, rows) for adapter, scale, rows in plan.groups if adapter in layer.lora_A]
    names = list(dict.fromkeys(adapter for adapter, _, _ in groups))
    stacked = None
    plain = all(
        isinstance(part, torch.nn.Linear) and part.bias is None
        for a in names
        for part in (layer.lora_A[a], layer.lora_B[a])
    )
    split = any(rows is not None for _, _, rows in groups)
    if plan.rows is not None and split and plain and isinstance(layer.base_layer, torch.nn.Linear):
        downs = [layer.lora_A[a].weight for a in names]
        offsets, total = {}, 0
        for adapter, down in zip(names, downs, strict=True):
            offsets[adapter], total = total, total + down.shape[0]
        weights = torch.zeros(plan.rows, total, dtype=downs[0].dtype, device=downs[0].device)
        for adapter, scale, rows in groups:
            ranks = slice(offsets[adapter], offsets[adapter] + layer.lora_A[adapter].weight.shape[0])
            weights[slice(None) if rows is None else rows, ranks] += layer.scaling[adapter] * scale
        stacked = (torch.cat(downs), weights, torch.cat([layer.lora_B[a].weight for a in names], dim=1))
    layer._muse_stacked = (plan, stacked)
    return stacked


def failure(assignment_id: str, exc: BaseException) -> Failure:
    """What the parent is told of a failed Assignment: a LoRA the request named that cannot be used is the
    request's fault (a 4xx naming `loras`), anything else a failed generation."""
    if isinstance(exc, LoraError):
        return Failure(assignment_id, str(exc), param="loras")
    return Failure(assignment_id, f"{type(exc).__name__}: {exc}")


def first_line(exc: BaseException) -> str:
    """The exception's first line, with the line after it where it only announces what follows (torch's
    "Error(s) in loading state_dict for CLIPTextModel:" before the size mismatch that says why)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return text[:300]
