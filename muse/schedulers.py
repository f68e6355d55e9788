"""Scheduler (sampler) names Muse accepts, as AUTOMATIC1111 users know them, and their diffusers classes.

Stdlib only: the API validates names without importing diffusers; the worker resolves the class.
"""

from __future__ import annotations

# "" means the scheduler stored with the model.
SCHEDULERS: dict[str, str] = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "Heun": "HeunDiscreteScheduler",
}
# Fewer steps than this fail inside the scheduler (PNDM's warm-up takes several model evaluations).
MIN_STEPS: dict[str, int] = {"PNDM": 4}
ALIASES: dict[str, str] = {cls.lower(): name for name, cls in SCHEDULERS.items()} | {
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "k_euler": "Euler",
    "dpmpp_2m": "DPM++ 2M",
    "ddim": "DDIM",
}


def canonical(name: str | None) -> str | None:
    """The canonical name for `name`, "" for the model's own, None if unknown."""
    if name is None or name == "" or name.lower() == "default":
        return ""
    if name in SCHEDULERS:
        return name
    return ALIASES.get(name.lower()) or next((n for n in SCHEDULERS if n.lower() == name.lower()), None)
