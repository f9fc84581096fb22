"""EVA-CLIP ViT (spec section 1): the visual encoder.

Parameter names follow the EVA-CLIP release (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.*,norm2,mlp.fc1,mlp.fc2}) so public weights
load by name (the fused qkv is split by the converter). EVA's own final norm is not built: Emu reads the
last block's output and applies its own `ln_visual` (see emu.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_emu.config import VisionConfig
from megatron_emu.model.attention import scaled_dot_product_attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> CLIP-normalised floats of `dtype`."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean) / std).to(dtype)


class EVAAttention(nn.Module):
    """Multi-head self-attention; q and v projections carry a bias, k does not.

    The release stores one fused `qkv` weight plus `q_bias` and `v_bias`; we keep three
    projections (the same function) so tensor parallelism can split each along heads.
    The checkpoint converter maps between the two layouts.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width, bias=True)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: a head-sharded copy (tensor parallel) runs unchanged.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, h, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v)  # (B, h, T, D)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


class EVAMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EVABlock(nn.Module):
    """Pre-LN transformer block: no layer-scale, no sub-LN, no rotary."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = EVAAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = EVAMlp(config.width, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, P, C)
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    """Returns all 257 tokens of the last block, before any final norm: (N, 257, width)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.width))
        self.blocks = nn.ModuleList(EVABlock(config) for _ in range(config.layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (N, 256, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (N, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (N, 257, C)
        for block in self.blocks:
            x = block(x)
        return x

    def init_stds(self, std: float) -> dict[str, float]:
        """Stds of the parameters no generic rule covers (model/init.py)."""
        return {"cls_token": std, "pos_embed": std}
