"""The step engine's pipeline families: which one a pipeline is (muse.worker.families.base says what one is).

Families on the step engine: SD 1.x/2.x and SDXL (UNet, .sd), FLUX.1 (.flux) and SD3.x (.sd3), transformers
with flow matching (.flow). Any other pipeline runs whole calls.
"""

from __future__ import annotations

from typing import Any

from muse.worker.families.base import Family
from muse.worker.families.flux import FluxFamily
from muse.worker.families.sd import StableDiffusionFamily
from muse.worker.families.sd3 import SD3Family

FAMILIES = (StableDiffusionFamily, FluxFamily, SD3Family)


def family_for(pipe: Any) -> Family | None:
    """The step engine's family for this pipeline, or None when it runs whole calls."""
    for family in FAMILIES:
        if family.knows(pipe):
            return family(pipe)
    return None


def supports(pipe: Any) -> bool:
    """Whether the step engine knows this pipeline (its class and its denoiser's conditioning)."""
    return family_for(pipe) is not None
