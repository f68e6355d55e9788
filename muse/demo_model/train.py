"""Train the embedded demo model from scratch on 2 CPU cores, reproducibly.

    python -m muse.demo_model.train                      # the shipped weights (~56 minutes)
    python -m muse.demo_model.train --smoke --out /tmp/x  # one tiny iteration end to end

Stage 1 trains the VAE on rendered scenes; stage 2 trains the UNet and the text encoder together on
the frozen VAE's latents, with 10 % empty captions so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tqdm import tqdm

from muse.demo_model import PIPELINE_FOLDER
from muse.demo_model.architecture import SPECS, ModelSpec, Pipeline, build_pipeline, save_pipeline
from muse.demo_model.scenes import Scene, caption, render_array, sample_scene

log = logging.getLogger("muse.demo_model.train")
# Chosen with benchmarks/demo_model_eval.py --sweep on the trained model; stored in muse.json.
DEFAULT_GUIDANCE = 2.5
DEFAULT_STEPS = 25
# What the page suggests (muse.json's "prompts"): sentences of the scenes' grammar, which the model draws.
PROMPTS: dict[str, Any] = {
    "placeholder": "a small blue triangle in the top right on a yellow background",
    "examples": [
        "a red circle on a blue background",
        "a large yellow triangle on a black background",
        "a small green square in the top left on a white background",
        "a small white circle in the bottom right on a purple background",
    ],
}


@dataclass(frozen=True)
class TrainConfig:
    spec: str = "demo"
    seed: int = 0
    images: int = 40_000
    vae_steps: int = 2_500
    vae_batch: int = 64
    vae_crop: int = 32
    vae_crop_until: float = 0.8
    vae_lr: float = 1e-3
    # Enough to keep the latent space smooth for diffusion, small enough not to blur edges.
    vae_kl_weight: float = 1e-6
    unet_steps: int = 5_000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    empty_caption: float = 0.1
    ema_decay: float = 0.999
    # Share of each batch drawn from the noisiest timesteps (>= layout_timestep), where only the
    # prompt can say where the shape goes. Position is learnt there all at once, after a few hundred
    # steps of this signal (measured); uniform timesteps alone gave too little of it in 56 minutes.
    # The share falls to layout_share_end by layout_share_until (a fraction of the stage), so that
    # detail, learnt at lower noise, gets the later steps; uniform timesteps keep 10 % up there.
    layout_timestep: int = 900
    layout_share_start: float = 0.75
    layout_share_end: float = 0.0
    layout_share_until: float = 0.4
    # Caps the loss weight of the easy low-noise steps (Min-SNR style) so they do not dominate.
    max_loss_weight: float = 5.0
    # Wall-time budgets (see Schedule): the VAE gets its own, the UNet what is left of the total.
    vae_minutes: float = 8.0
    max_minutes: float = 56.0
    guidance_scale: float = DEFAULT_GUIDANCE

    def scaled(self, factor: float) -> TrainConfig:
        return dataclasses.replace(
            self,
            vae_steps=max(1, round(self.vae_steps * factor)),
            unet_steps=max(1, round(self.unet_steps * factor)),
        )

    def layout_share(self, progress: float) -> float:
        fallen = min(1.0, progress / self.layout_share_until) if self.layout_share_until > 0 else 1.0
        return self.layout_share_start + (self.layout_share_end - self.layout_share_start) * fallen


SMOKE = TrainConfig(images=32, vae_steps=1, vae_batch=8, unet_steps=1, unet_batch=8, unet_warmup=1)


def render_dataset(count: int, size: int, rng: random.Random) -> tuple[list[Scene], np.ndarray]:
    scenes = [sample_scene(rng) for _ in range(count)]
    pixels = np.stack([render_array(scene, size) for scene in tqdm(scenes, desc="render", mininterval=5)])
    return scenes, pixels


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batches(count: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices for `steps` batches, walking through shuffled epochs."""
    order = torch.randperm(count, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        yield order[cursor : cursor + batch]
        cursor += batch


class Schedule:
    """Warm-up then cosine decay over a stage, measured in steps or in wall time, whichever runs
    out first: on a shared machine the stage still anneals properly and ends on time. When the
    machine is free the steps run out first and the run is reproducible step for step."""

    def __init__(self, steps: int, warmup: int, deadline: float) -> None:
        self.steps, self.warmup = steps, warmup
        self.start, self.deadline = time.monotonic(), deadline

    def progress(self, step: int) -> float:
        elapsed = (time.monotonic() - self.start) / max(self.deadline - self.start, 1e-9)
        return max(step / self.steps, elapsed)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step))))

    def done(self, step: int) -> bool:
        if self.progress(step + 1) >= 1.0 and step + 1 < self.steps:
            log.warning("stage stopped at step %d of %d: its time budget is spent", step + 1, self.steps)
        return self.progress(step + 1) >= 1.0


def train_vae(pipe: Pipeline, pixels: np.ndarray, cfg: TrainConfig, deadline: float) -> None:
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    schedule = Schedule(cfg.vae_steps, min(50, cfg.vae_steps), deadline)
    bar = tqdm(batches(len(pixels), cfg.vae_batch, cfg.vae_steps, generator), total=cfg.vae_steps, desc="vae")
    for step, index in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * schedule.lr_factor(step)
        images = to_tensor(pixels[index.numpy()])
        if schedule.progress(step) < cfg.vae_crop_until:
            # The VAE is convolutional, so crops teach it edges at a quarter of the cost per sample.
            side = cfg.vae_crop
            x, y = (int(v) * 4 for v in torch.randint(0, (images.shape[-1] - side) // 4 + 1, (2,), generator=generator))
            images = images[:, :, y : y + side, x : x + side]
        else:
            # Whole images at the end, so GroupNorm sees the statistics it will see when serving.
            images = images[: max(1, len(images) // 4)]
        # bf16 autocast doubles VAE speed on this CPU; the UNet is faster in fp32 (measured).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = F.mse_loss(decoded.float(), images)
        loss = reconstruction + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{reconstruction.item():.4f}", refresh=False)
        if schedule.done(step):
            break
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(pipe: Pipeline, pixels: np.ndarray, measure: bool = True) -> torch.Tensor:
    """Posterior means of the whole dataset, scaled to unit std as Stable Diffusion does; the factor
    is stored in the VAE config so the pipeline undoes it when decoding. A resumed run keeps the
    factor its UNet was trained with."""
    chunks = []
    for start in tqdm(range(0, len(pixels), 256), desc="encode", mininterval=5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chunks.append(pipe.vae.encode(to_tensor(pixels[start : start + 256])).latent_dist.mean.float())
    latents = torch.cat(chunks)
    scaling_factor = float(1.0 / latents.std()) if measure else float(pipe.vae.config.scaling_factor)
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    log.info("latent scaling factor %.4f", scaling_factor)
    return latents * scaling_factor


def loss_weights(alphas_cumprod: torch.Tensor, prediction_type: str, cap: float) -> torch.Tensor:
    """Per-timestep weights that make the loss, in terms of the clean latent's error, weigh
    min(SNR + 1, cap). The noisiest steps keep weight 1: they are where the layout is decided, so the
    prompt's position words must pay off there. (Plain epsilon loss weighs them by SNR, near 0.)"""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # A v error of e is a clean-latent error of e / sqrt(SNR + 1); an epsilon error, e / sqrt(SNR).
    native = snr + 1 if prediction_type == "v_prediction" else snr.clamp(min=1e-8)
    return (snr + 1).clamp(max=cap) / native


class Ema:
    """Exponential moving average of weights; sampling from it gives cleaner images from short runs."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Warm-up: early weights are noise, so average over a shorter horizon at first.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights; calling it twice restores the live ones."""
        for param, shadow in zip(self.params, self.shadow, strict=True):
            live = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(live)


def tokenize(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    # Padded to the full length exactly as the pipeline does at inference.
    return pipe.tokenizer(
        texts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_denoiser(
    pipe: Pipeline,
    latents: torch.Tensor,
    scenes: list[Scene],
    cfg: TrainConfig,
    deadline: float,
    snapshot: tuple[Path, int] | None = None,
) -> None:
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    loss_weight = loss_weights(alphas, noise_scheduler.config.prediction_type, cfg.max_loss_weight)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = Ema([unet, text_encoder], cfg.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    rng = random.Random(cfg.seed + 3)
    v_target = noise_scheduler.config.prediction_type == "v_prediction"
    schedule = Schedule(cfg.unet_steps, cfg.unet_warmup, deadline)
    bar = tqdm(batches(len(latents), cfg.unet_batch, cfg.unet_steps, generator), total=cfg.unet_steps, desc="unet")
    running = None
    for step, index in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = cfg.unet_lr * schedule.lr_factor(step)
        texts = ["" if rng.random() < cfg.empty_caption else caption(scenes[i], rng) for i in index.tolist()]
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (len(index),), generator=generator)
        layout = torch.rand(len(index), generator=generator) < cfg.layout_share(schedule.progress(step))
        noisiest = torch.randint(cfg.layout_timestep, len(alphas), (len(index),), generator=generator)
        timesteps = torch.where(layout, noisiest, timesteps)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        hidden = text_encoder(tokenize(pipe, texts))[0]
        predicted = unet(noisy, timesteps, hidden).sample
        target = noise_scheduler.get_velocity(clean, noise, timesteps) if v_target else noise
        per_sample = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if snapshot is not None and (step + 1) % snapshot[1] == 0:
            # Lets the eval judge a run while it still trains.
            ema.swap()
            save_pipeline(pipe, snapshot[0] / f"step-{step + 1:05d}", serving_defaults(cfg, pipe))
            ema.swap()
        if schedule.done(step):
            break
    ema.swap()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def serving_defaults(cfg: TrainConfig, pipe: Pipeline) -> dict[str, Any]:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": DEFAULT_STEPS,
        "width": native,
        "height": native,
        "prompts": PROMPTS,
    }


def train(cfg: TrainConfig, out: Path, snapshot: tuple[Path, int] | None = None, resume: Path | None = None) -> Path:
    """From scratch, or with ``resume`` a further UNet + text-encoder stage on a trained folder
    (same data, same frozen VAE): how a run cut short by a busy machine is finished."""
    started = time.monotonic()
    deadline = started + cfg.max_minutes * 60
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    spec: ModelSpec = SPECS[cfg.spec]
    pipe = StableDiffusionPipeline.from_pretrained(resume) if resume else build_pipeline(spec, seed=cfg.seed)
    scenes, pixels = render_dataset(cfg.images, spec.image_size, random.Random(cfg.seed))
    if resume is None:
        train_vae(pipe, pixels, cfg, min(deadline, time.monotonic() + cfg.vae_minutes * 60))
    pipe.vae.eval().requires_grad_(False)
    latents = encode_latents(pipe, pixels, measure=resume is None)
    del pixels
    train_denoiser(pipe, latents, scenes, cfg, deadline, snapshot)
    save_pipeline(pipe, out, serving_defaults(cfg, pipe))
    log.info("trained in %.1f minutes; wrote %s", (time.monotonic() - started) / 60, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the Muse demo model from scratch.")
    parser.add_argument("--out", type=Path, default=PIPELINE_FOLDER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one tiny iteration, for tests")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply both stages' steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--snapshots", type=Path, help="also save the EMA model here every N UNet steps")
    parser.add_argument("--snapshot-every", type=int, default=1000)
    parser.add_argument("--resume", type=Path, help="continue the UNet stage of this trained folder")
    parser.add_argument("--minutes", type=float, help="wall-time budget of the whole run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    base = SMOKE if args.smoke else TrainConfig()
    cfg = dataclasses.replace(base, seed=args.seed).scaled(args.steps_scale)
    if args.minutes is not None:
        cfg = dataclasses.replace(cfg, max_minutes=args.minutes)
    if args.resume is not None:
        # Fine-tuning already trained weights: a gentler peak learning rate.
        cfg = dataclasses.replace(cfg, unet_lr=cfg.unet_lr / 2)
    log.info("config %s", cfg)
    snapshot = (args.snapshots, args.snapshot_every) if args.snapshots else None
    train(cfg, args.out, snapshot, args.resume)


if __name__ == "__main__":
    main()
