"""Stable Diffusion v1.5 components (diffusers format) and the UNet's re-sized cross-attention.

SD v1.5's UNet attends to 768-wide CLIP text states; Emu conditions it on its own
hidden states (5120 wide for emu-14b, spec section 7). Only the cross-attention key
and value projections (`attn2.to_k`, `attn2.to_v`) read the condition, so only they
are replaced (fresh nn.Linear, PyTorch's default init, as a new diffusers UNet gets);
every other pretrained weight, `attn2.to_q` / `to_out` included, is kept.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import nn

from megatron_emu.files import read_json

log = logging.getLogger("megatron_emu")

# SD v1.5's training noise schedule (its scheduler/scheduler_config.json).
SD15_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, clip_sample=False,
)


class SDComponents(NamedTuple):
    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    scheduler_config: dict  # noise schedule; DDPM for training, PNDM for sampling


def load_sd_components(path: str) -> SDComponents:
    """unet/, vae/, scheduler/ of a diffusers Stable Diffusion directory (weights on CPU, fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not os.path.isdir(path):
        raise ValueError(f"{path}: --pretrained-sd is not a directory")
    for sub in ("unet", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"{path}: no {sub}/ subfolder (expected a diffusers Stable Diffusion layout: unet/, vae/, scheduler/)")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValueError(f"{path}: unreadable diffusers weights ({str(e).splitlines()[0]})") from None
    return SDComponents(unet, vae, load_schedule(os.path.join(path, "scheduler")))


def load_schedule(path: str) -> dict:
    """The noise schedule of a scheduler/ folder; must be SD's epsilon-prediction DDPM family."""
    config_path = os.path.join(path, "scheduler_config.json")
    config = read_json(config_path, "missing or unreadable scheduler config", reason_type_only=True)
    schedule = {k: config.get(k, v) for k, v in SD15_SCHEDULE.items()}
    if schedule["prediction_type"] != "epsilon":
        raise ValueError(f"{config_path}: prediction_type {schedule['prediction_type']!r}, the decoder trains epsilon prediction")
    return schedule


def build_tiny_sd(cross_attention_dim: int, seed: int = 0) -> SDComponents:
    """A few-hundred-thousand-parameter UNet + VAE with SD's block types, for CPU tests and smoke runs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=64,
    )
    return SDComponents(unet, vae, dict(SD15_SCHEDULE))


def save_sd_components(components: SDComponents, path: str) -> None:
    """Write unet/, vae/, scheduler/ in diffusers format (loadable by load_sd_components and diffusers)."""
    from diffusers import DDPMScheduler

    components.unet.save_pretrained(os.path.join(path, "unet"))
    components.vae.save_pretrained(os.path.join(path, "vae"))
    DDPMScheduler.from_config(components.scheduler_config).save_pretrained(os.path.join(path, "scheduler"))


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent cell (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def cross_attention_dim(unet: nn.Module) -> int:
    dim = unet.config.cross_attention_dim
    if not isinstance(dim, int):
        raise ValueError(f"UNet has per-block cross_attention_dim {dim}; the decoder needs one width")
    return dim


def resize_cross_attention(unet: nn.Module, dim: int) -> list[str]:
    """Re-create every attn2.to_k / attn2.to_v for `dim`-wide conditions; returns their names.

    A UNet whose cross-attention already reads `dim` (an Emu decoder being finetuned
    further) is left untouched, so continuing a finetune keeps its learnt k/v.
    """
    if cross_attention_dim(unet) == dim:
        return []
    replaced = []
    for name, module in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        for proj in ("to_k", "to_v"):
            old: nn.Linear = getattr(module, proj)
            new = nn.Linear(dim, old.out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            setattr(module, proj, new)
            replaced.append(f"{name}.{proj}")
        module.cross_attention_dim = dim
    if not replaced:
        raise ValueError("UNet has no cross-attention (attn2) layers to condition on Emu")
    # Saved with the UNet, so from_pretrained rebuilds the re-sized projections.
    unet.register_to_config(cross_attention_dim=dim)
    log.info("cross-attention re-sized to %d: re-initialised %d projections", dim, len(replaced))
    return replaced


def check_condition_dim(unet: nn.Module, hidden: int, where: str) -> None:
    """The UNet must read conditions as wide as Emu's hidden states."""
    dim = cross_attention_dim(unet)
    if dim != hidden:
        raise ValueError(
            f"{where}: UNet cross-attention dim is {dim} but the Emu hidden size is {hidden}; "
            "the decoder must be finetuned for this Emu"
        )
