"""One image the step engine makes, as the parent asked for it."""

from __future__ import annotations

from dataclasses import dataclass

from muse.messages import LoraUse, SourceImage, StepKey


@dataclass(frozen=True)
class SlotRequest:
    """One image to make: what the parent sends for it. `slot_id` is unique among the engine's slots; `owner`
    and `index` say whose image it is (an Assignment's id, the image's place in it), for the loop above."""

    slot_id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str = ""  # "" = the model's own
    owner: str = ""
    index: int = 0
    source: SourceImage | None = None  # img2img or inpainting: the picture it starts from
    loras: tuple[LoraUse, ...] = ()

    @property
    def step_key(self) -> StepKey:
        return StepKey(self.width, self.height)
