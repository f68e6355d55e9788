from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real diffusers pipeline folder with random weights, small enough for a test to run it many times."""
    from muse.demo_model.architecture import TINY_SPEC, build_pipeline, save_pipeline

    folder: Path = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(build_pipeline(TINY_SPEC, seed=0), folder, {"guidance_scale": 3.0})
    return str(folder)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny StableDiffusionXLPipeline with random weights (two text encoders, size conditioning), with the
    embedded model's tokenizer for both encoders."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from muse.config import EMBEDDED_MODEL

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(Path(EMBEDDED_MODEL) / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=16,
        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )  # fmt: skip
    folder: Path = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(folder)
    return str(folder)
