"""The per-row sampler twins against diffusers' own schedulers, step by step (muse.worker.samplers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from muse.worker.samplers import fused_step, linear_steps

# Stable Diffusion checkpoints store clip_sample false; diffusers' own default clips (that has no twin).
DDIM_CONFIGS: list[dict[str, object]] = [
    {"prediction_type": "epsilon"},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "set_alpha_to_one": True},
    {"prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "timestep_spacing": "linspace"},
]


@pytest.mark.parametrize("config", DDIM_CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_the_ddim_twin_matches_the_scheduler_at_every_step(config: dict[str, object], steps: int) -> None:
    scheduler = DDIMScheduler(**{"clip_sample": False, **config})
    scheduler.set_timesteps(steps)
    coefficients = linear_steps(scheduler)
    assert coefficients is not None and len(coefficients) == steps
    generator = torch.Generator().manual_seed(steps)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        output = torch.randn(3, 4, 8, 8, generator=generator)
        expected = scheduler.step(output, t, sample, eta=0.0, return_dict=False)[0]
        got = fused_step(sample, output, [coefficients[i]] * 3)
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item()), (i, int(t))
        sample = expected


def flux_schedule(steps: int, mu: float) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


def sd3_schedule(steps: int, mu: float) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("schedule", [flux_schedule, sd3_schedule], ids=["flux", "sd3"])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_the_flow_euler_twin_matches_the_scheduler_at_every_step(schedule: Any, steps: int, mu: float) -> None:
    scheduler = schedule(steps, mu)
    coefficients = linear_steps(scheduler)
    assert coefficients is not None and len(coefficients) == steps
    generator = torch.Generator().manual_seed(steps)
    sample = torch.randn(2, 16, 8, generator=generator)  # FLUX's packed tokens: (rows, tokens, channels)
    for i, t in enumerate(scheduler.timesteps):
        output = torch.randn(2, 16, 8, generator=generator)
        expected = scheduler.step(output, t, sample, return_dict=False)[0]
        got = fused_step(sample, output, [coefficients[i]] * 2)
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item()), (i, float(t))
        sample = expected


def test_rows_at_different_timesteps_step_together() -> None:
    schedulers = [DDIMScheduler(prediction_type="v_prediction", clip_sample=False) for _ in range(3)]
    for scheduler, steps in zip(schedulers, (10, 25, 50), strict=True):
        scheduler.set_timesteps(steps)
    picks = [(schedulers[0], 3), (schedulers[1], 0), (schedulers[2], 49)]
    sample, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    coefficients = [linear_steps(s)[i] for s, i in picks]  # type: ignore[index]
    got = fused_step(sample, output, coefficients)
    for row, (scheduler, i) in enumerate(picks):
        t = scheduler.timesteps[i]
        expected = scheduler.step(output[row : row + 1], t, sample[row : row + 1], eta=0.0, return_dict=False)[0]
        assert torch.allclose(got[row : row + 1], expected, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(clip_sample=True),
        DDIMScheduler(thresholding=True),
        EulerDiscreteScheduler(),
        FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    ],
    ids=["ddim-clipped", "ddim-thresholding", "euler", "flow-stochastic"],
)
def test_samplers_without_a_twin_keep_their_own_step(scheduler: object) -> None:
    scheduler.set_timesteps(10)  # type: ignore[attr-defined]
    assert linear_steps(scheduler) is None
