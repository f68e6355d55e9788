"""Per-row twins of diffusers' scheduler steps, for the step engine's slots that allow one.

The step engine runs one UNet call over slots at different timesteps; stepping each slot's own scheduler
instance afterwards costs a dozen small tensor operations per slot per step, about 8 % of a CPU step at 8
slots (the whole-call pipeline pays them once for its batch). Where a scheduler's step is a fixed linear
map of (sample, model output) at each of its timesteps, it is written here as two coefficients per
timestep, computed once when the slot is admitted, and every such slot then steps in one fused
`a * sample + b * output` over all their rows.

Covered: DDIM (`DDIMScheduler`) with eta 0 (what the pipelines pass), no thresholding and no clipping,
for every prediction type; flow matching's Euler (`FlowMatchEulerDiscreteScheduler`, FLUX and SD3), without
stochastic sampling: `sample + (sigma_next - sigma) * output`. Anything else (Euler, DPM++ 2M, UniPC,
clipped DDIM, …) keeps its own scheduler instance's `step`: diffusers stays the reference, and
tests/test_samplers.py checks each twin against it step by step.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def linear_steps(scheduler: Any) -> list[tuple[float, float]] | None:
    """For a scheduler whose `set_timesteps` was called: `(a, b)` per timestep such that its step gives
    `a * sample + b * model_output`, or None when its step is not such a map (then step it as it is)."""
    kind = type(scheduler).__name__
    if kind == "FlowMatchEulerDiscreteScheduler":
        return _flow_euler(scheduler)
    if kind != "DDIMScheduler":
        return None
    config = scheduler.config
    if config.thresholding or config.clip_sample:
        return None
    alphas = scheduler.alphas_cumprod
    final = float(scheduler.final_alpha_cumprod)
    stride = config.num_train_timesteps // scheduler.num_inference_steps
    prediction = config.prediction_type
    steps = []
    for t in scheduler.timesteps.tolist():
        prev = t - stride
        a_t = float(alphas[t])
        a_prev = float(alphas[prev]) if prev >= 0 else final
        coefficients = _ddim(a_t, a_prev, prediction)
        if coefficients is None:
            return None
        steps.append(coefficients)
    return steps


def _flow_euler(scheduler: Any) -> list[tuple[float, float]] | None:
    """Euler on the flow: the sigma step, computed in float32 from the scheduler's own sigmas as it does."""
    if scheduler.config.stochastic_sampling:
        return None
    sigmas = scheduler.sigmas.to(torch.float32).cpu()
    return [(1.0, float(sigmas[i + 1] - sigmas[i])) for i in range(len(scheduler.timesteps))]


def _ddim(a_t: float, a_prev: float, prediction: str) -> tuple[float, float] | None:
    """DDIM (eta 0): prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with x0 and eps linear in the sample
    and the model output as the prediction type says."""
    sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
    sp, sq = math.sqrt(a_prev), math.sqrt(1 - a_prev)
    if prediction == "epsilon":  # x0 = (x - sb e) / sa, eps = e
        return sp / sa, sq - sp * sb / sa
    if prediction == "v_prediction":  # x0 = sa x - sb v, eps = sa v + sb x
        return sp * sa + sq * sb, sq * sa - sp * sb
    if prediction == "sample" and sb > 0:  # x0 = m, eps = (x - sa m) / sb
        return sq / sb, sp - sq * sa / sb
    return None


def fused_step(samples: torch.Tensor, outputs: torch.Tensor, coefficients: list[tuple[float, float]]) -> torch.Tensor:
    """One step of many rows at once: row i is `a_i * samples[i] + b_i * outputs[i]`, computed in float32
    whatever the rows' dtype (fp16 coefficients would round once more than diffusers' own arithmetic)."""
    a = torch.tensor([c[0] for c in coefficients], dtype=torch.float32, device=samples.device)
    b = torch.tensor([c[1] for c in coefficients], dtype=torch.float32, device=samples.device)
    shape = (-1,) + (1,) * (samples.dim() - 1)
    return (a.view(shape) * samples.float() + b.view(shape) * outputs.float()).to(samples.dtype)
