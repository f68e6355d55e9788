"""Shapes of the demo model and a builder for random-weight pipelines of the standard diffusers classes.

Everything is built offline from configs, so the embedded model (and the tiny one the tests use) loads
through ``DiffusionPipeline.from_pretrained`` exactly like a Stable Diffusion checkpoint.

    python -m muse.demo_model.architecture --spec tiny --out /tmp/tiny-pipeline
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from muse.demo_model.scenes import VOCABULARY

# A StableDiffusionPipeline, typed as Any: mypy resolves `diffusers.StableDiffusionPipeline` to the
# placeholder in diffusers.utils.dummy_* (the first branch of diffusers' import fallback), which lacks
# the real class's methods, and the real class sets its components (vae, unet, text_encoder, tokenizer,
# scheduler) at runtime through register_modules, so no type checker sees them anyway.
Pipeline: TypeAlias = Any

SERVING_DEFAULTS_FILE = "muse.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Stable Diffusion's noise schedule rescaled to zero terminal SNR, with v-prediction and sampling
# from the last timestep (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed").
# With SD's own schedule the noisiest training input still leaks the image's layout, so the model
# learnt to read where to draw from the noise and ignored position words: the first sampling step
# now sees pure noise in training too, and only the prompt can say where the shape goes.
# Training uses it through DDPMScheduler, sampling through DDIM.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    image_size: int  # native output side in pixels
    vae_channels: tuple[int, ...]  # one entry per VAE block; each after the first halves the side
    vae_groups: int
    latent_channels: int
    unet_channels: tuple[int, ...]
    # Cross-attention only where the feature map is small: at full latent resolution it costs most.
    unet_cross_attention: tuple[bool, ...]
    unet_layers_per_block: int
    unet_groups: int
    cross_attention_dim: int
    attention_head_dim: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_tokens: int  # includes the start and end tokens
    vocabulary: tuple[str, ...] = VOCABULARY

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor


TINY_SPEC = ModelSpec(
    name="tiny",
    image_size=32,
    vae_channels=(8, 8, 8),
    vae_groups=4,
    latent_channels=4,
    unet_channels=(16, 16),
    unet_cross_attention=(False, True),
    unet_layers_per_block=1,
    unet_groups=8,
    cross_attention_dim=16,
    attention_head_dim=8,
    text_hidden=16,
    text_layers=1,
    text_heads=2,
    text_intermediate=32,
    max_tokens=16,
)

DEMO_SPEC = ModelSpec(
    name="demo",
    image_size=64,
    # Three stages: 64x64 pixels -> 4x16x16 latents, the same latent cost as a 32x32 model.
    vae_channels=(16, 32, 32),
    vae_groups=8,
    latent_channels=4,
    unet_channels=(32, 64, 64),
    unet_cross_attention=(False, True, True),
    unet_layers_per_block=1,
    unet_groups=16,
    cross_attention_dim=64,
    attention_head_dim=16,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    text_intermediate=256,
    max_tokens=20,
)

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (TINY_SPEC, DEMO_SPEC)}


def build_tokenizer(spec: ModelSpec) -> CLIPTokenizer:
    """A CLIP BPE tokenizer trained on the grammar's words, with all 256 byte symbols (plain and
    word-final) in the vocabulary, so any text tokenizes without unknown tokens."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    draft = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    # Reuse CLIP's normalizer and pre-tokenizer so training splits words exactly as encoding will.
    trainee = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    trainee.normalizer = draft.backend_tokenizer.normalizer or normalizers.Lowercase()
    trainee.pre_tokenizer = draft.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=byte_symbols,
        end_of_word_suffix="</w>",
    )
    trainee.train_from_iterator(sorted(spec.vocabulary), trainer=trainer)
    learned = json.loads(trainee.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    vocab: dict[str, int] = {}
    for token in [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    # CLIPTokenizer's hint says list[str], but it hands `merges` straight to tokenizers' BPE, whose
    # merges are (left, right) pairs: the cast only quiets the inaccurate hint.
    return CLIPTokenizer(vocab=vocab, merges=cast(Any, merges), model_max_length=spec.max_tokens)


def scheduler_config() -> dict[str, Any]:
    return dict(SCHEDULER_CONFIG)


def build_pipeline(spec: ModelSpec, seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_tokens,
            projection_dim=spec.cross_attention_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae_blocks = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.image_size,
        # Flat-colour scenes need no global mixing; attention at this size only costs time.
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in spec.unet_cross_attention),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(spec.unet_cross_attention)
        ),
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        norm_num_groups=spec.unet_groups,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Pipeline, folder: str | Path, defaults: dict[str, Any]) -> Path:
    """Save in the standard layout plus ``muse.json``, the serving defaults the server reads."""
    if "guidance_scale" not in defaults:
        raise ValueError("serving defaults need a guidance_scale")
    folder = Path(folder)
    # Training pads every batch; the tokenizer must not keep that state in the saved folder.
    pipe.tokenizer.backend_tokenizer.no_padding()
    pipe.tokenizer.backend_tokenizer.no_truncation()
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    if index.pop("_name_or_path", None) is not None:
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    serving = {**defaults, "guidance_scale": float(defaults["guidance_scale"])}
    (folder / SERVING_DEFAULTS_FILE).write_text(json.dumps(serving, indent=2, sort_keys=True) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight demo pipeline folder.")
    parser.add_argument("--spec", choices=sorted(SPECS), default="tiny")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = SPECS[args.spec]
    save_pipeline(build_pipeline(spec, args.seed), args.out, {"guidance_scale": 4.0})
    print(f"wrote a random-weight {spec.name} pipeline to {args.out}")


if __name__ == "__main__":
    main()
