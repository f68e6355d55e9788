"""Small LoRA files for a pipeline folder (SD, SDXL, FLUX, SD3), built offline for tests and benchmarks: random
low-rank deltas on the denoiser's attention projections (and the CLIP text encoders'), saved as diffusers writes
LoRAs, or with kohya/A1111's key names (UNet pipelines). They change the pictures visibly without ruining them.

    python -m muse.demo_model.loras MODEL_FOLDER OUT_FOLDER [--count 4] [--kohya]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

# Attention projections: a UNet's, and FLUX's and SD3's transformers' (their image stream's) alike.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# A transformer's attention moves its few-layer test twins' pictures little: their output projection too.
TRANSFORMER_TARGETS = [*UNET_TARGETS, "proj_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    model: str,
    path: Path,
    seed: int,
    *,
    rank: int = 4,
    kohya: bool = False,
    strength: float = 0.3,
    alpha: float | None = None,
) -> Path:
    """Write a LoRA for the pipeline in `model` to `path` (a .safetensors file); returns `path`. Its denoiser (a
    UNet, or FLUX's or SD3's transformer: their attention projections have the same names) and its CLIP text
    encoders get deltas; kohya's layout is written for UNet pipelines only (FLUX's trainers name blocks their own
    way). `alpha`: written in the header as diffusers' trainers write rank and alpha (`lora_adapter_metadata`),
    so the deltas scale by alpha / rank; without it the file says nothing and they scale by 1."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(model)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    if kohya and denoiser != "unet":
        raise ValueError("kohya's key layout is written for UNet pipelines only")
    encoders = [
        name
        for name in ("text_encoder", "text_encoder_2")
        if type(getattr(pipe, name, None)).__name__.startswith("CLIPTextModel")
    ]
    torch.manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    settings: dict[str, Any] = {}
    targets = [(denoiser, UNET_TARGETS if denoiser == "unet" else TRANSFORMER_TARGETS)]
    targets += [(name, TEXT_TARGETS) for name in encoders]
    for prefix, names in targets:
        module = getattr(pipe, prefix)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=False)
        inject_adapter_in_model(config, module)
        for key, value in get_peft_model_state_dict(module).items():
            # Random A and B, scaled so a delta moves each projection by a fraction of its own size.
            scale = strength / rank**0.5 if "lora_B" in key else 1.0
            layers[f"{prefix}.{key}"] = (value * scale).contiguous()
        settings |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": names}
    if kohya:
        layers = to_kohya(layers, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt"}
    if alpha is not None:
        header["lora_adapter_metadata"] = json.dumps(settings, sort_keys=True)
    save_file(layers, str(path), metadata=header)
    return path


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def to_kohya(layers: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """diffusers' key names as kohya's scripts (and A1111) write them: `lora_unet_…_to_q.lora_down.weight`,
    `lora_te_…`, with an alpha per layer."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        prefix, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = KOHYA_PREFIXES[prefix] + module.replace(".", "_")
        converted[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        converted[f"{name}.alpha"] = torch.tensor(float(rank))
    return converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--kohya", action="store_true", help="kohya/A1111 key names")
    args = parser.parse_args()
    for i in range(args.count):
        print(make_lora(args.model, Path(args.out) / f"style{i}.safetensors", seed=i, kohya=args.kohya))


if __name__ == "__main__":
    main()
