"""LoRA adapters per request, several different ones in one model call.

Adapters are loaded into the pipeline by diffusers (`load_lora_weights`: its PEFT layers, diffusers/PEFT and
kohya/A1111 key layouts alike), never merged into the weights. Every PEFT LoRA layer of the pipeline then
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
        self.reads: dict[str, tuple[tuple[int, int], Future[dict[str, torch.Tensor]]]] = {}
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

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(name)))

    def _install(self, name: str, stamp: tuple[int, int], weights: dict[str, torch.Tensor]) -> None:
        self._count += 1
        adapter = f"muse_{self._count}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"[:64]
        try:
            with warnings.catch_warnings():
                # PEFT warns of a second adapter in one model: several side by side is the point, rows pick
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # ...and of keys that fit no layer, which load_adapter counts and refuses with a plainer message.
                warnings.filterwarnings("ignore", message="While injecting the PEFT adapters, an inconsistency")
                load_adapter(self.pipe, weights, adapter)
        except Exception:
            remove_partial(self.pipe, adapter)
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
            adapter = self.loaded.pop(name).adapter
            self.pipe.delete_adapters([adapter])
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


# A LoRA layer's down-projection, in each key layout diffusers' readers return (one per adapted layer).
DOWN = re.compile(r"\.(lora_A|lora\.down|lora_down)\.weight$")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP: SD's, SDXL's two, FLUX's one, SD3's two (not T5)


def load_adapter(pipe: Any, weights: dict[str, torch.Tensor], adapter: str) -> None:
    """Put a LoRA file's weights into the pipeline as `adapter`: diffusers converts its key layout (diffusers,
    PEFT, kohya/A1111, and FLUX's trainers' where its loader knows them) and loads its denoiser part (a UNet or
    a transformer); its text encoders' parts go in through PEFT itself, as diffusers' own text-encoder path does
    (that path asks transformers for a newer PEFT than may be installed). A file for another architecture fails
    here: missing modules or mismatched shapes."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state, alphas = lora_state(pipe, weights)
    if not state or not all("lora" in key for key in state):
        # FLUX Control LoRAs also replace norm layers and widen the input: not a delta a row can opt out of.
        raise ValueError("not a LoRA file (its tensors are not all named as LoRA layers)")
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    # An SD LoRA's UNet part in a FLUX pipeline would otherwise be dropped and its text part used alone.
    places = {name} | {e for e in TEXT_ENCODERS if getattr(pipe, e, None) is not None}
    owners = {key.split(".", 1)[0] for key in state}
    if not owners & (places | {"unet", "transformer", *TEXT_ENCODERS}):
        # A trainer that saved the denoiser's layers alone often leaves out whose they are.
        state = {f"{name}.{key}": value for key, value in state.items()}
        alphas = {f"{name}.{key}": value for key, value in alphas.items()} if alphas else alphas
        owners = {name}
    foreign = sorted(owners - places)
    if foreign:
        raise ValueError(f"its {', '.join(foreign)} layers have no place in a {type(pipe).__name__}")
    denoiser_part = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
    if denoiser_part:
        denoiser = getattr(pipe, name)
        denoiser.load_lora_adapter(
            denoiser_part, prefix=name, network_alphas=alphas, adapter_name=adapter, _pipeline=pipe
        )
        # diffusers only warns of layers the model lacks: a LoRA for another model of the same family must fail.
        wanted = sum(1 for key in denoiser_part if DOWN.search(key))
        placed = sum(1 for m in denoiser.modules() if adapter in getattr(m, "lora_A", {}))
        if placed < wanted:
            raise ValueError(f"{wanted - placed} of its {wanted} {name} layers fit no layer of this model")
    for encoder_name in TEXT_ENCODERS:
        encoder = getattr(pipe, encoder_name, None)
        prefix = f"{encoder_name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if encoder is None or not part:
            continue
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not hasattr(encoder, "text_model"):  # CLIPTextModel is flat in newer transformers
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        ranks = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
        own_alphas = None
        if alphas:
            own_alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
        config = _create_lora_config(part, own_alphas, None, ranks, is_unet=False)
        inject_adapter_in_model(config, encoder, adapter_name=adapter)
        result = set_peft_model_state_dict(encoder, part, adapter_name=adapter)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter in k or "lora" in k]
        if unexpected:
            raise ValueError(f"{len(unexpected)} of its {encoder_name} tensors fit no layer, e.g. {unexpected[0]}")


def lora_state(pipe: Any, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's tensors as diffusers names them for this pipeline, and their alphas where the layout keeps
    them apart: SD's loader returns both, FLUX's when asked, SD3's only the tensors."""
    if "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters:
        read = pipe.lora_state_dict(dict(weights), return_alphas=True)
    else:
        read = pipe.lora_state_dict(dict(weights))
    if isinstance(read, tuple):
        return read[0], read[1]
    return read, None


def remove_partial(pipe: Any, adapter: str) -> None:
    """Take out whatever part of a failed load went in, layer by layer: diffusers' `delete_adapters` wants an
    adapter every component knows, and a load that failed half way (the text encoder after the transformer) left
    its layers in some components only, where every later call would carry them."""
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
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return text[:200]
