"""Tensor-parallel placement of the image encoders: split heads, or split the images.

Under TP the EVA ViT and the Causal Former can be placed two ways, chosen per module:
- heads: each rank holds 1/T of the heads and FFN (tensor_parallel.py); every block
  all-reduces its activations (N, tokens, width) twice in forward and twice in backward.
  When T does not divide the heads the module is replicated instead, and every TP rank
  encodes every image (T times the compute).
- images: the module is replicated and each TP rank encodes 1/T of the micro-batch's
  images; the results are all-gathered once, after the last image-split module (32
  embeddings per image after the Causal Former, 257 tokens after the ViT). Its parameters'
  gradients, each rank's from its own images, are summed over TP once per step.

`auto` picks, per module, the placement that moves fewer bytes per step (below). The
split is applied from outside the model with forward hooks on `visual`, `ln_visual` and
`causal_former`: images are sliced on the way into the first image-split module and
gathered on the way out of the last.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_emu.config import ModelConfig
from megatron_emu.memo import cached
from megatron_emu.model.causal_former import CausalFormer
from megatron_emu.model.vision import EVAVisionTransformer

PLACEMENTS = ("heads", "images", "auto")
ENCODERS = ("visual", "causal_former")

# Modules whose parameters compute on a rank's share of the images, per image-split encoder.
_SPLIT_MODULES: "weakref.WeakKeyDictionary[nn.Module, list[nn.Module]]" = weakref.WeakKeyDictionary()


def choose_placement(choice: str, config: ModelConfig, tp: int, images_per_step: float) -> dict[str, str]:
    """{"visual": p, "causal_former": p}, p in heads | images | replicated (heads asked, T does
    not divide them). images_per_step: images one DP rank encodes per optimizer step."""
    if choice not in PLACEMENTS:
        raise ValueError(f"--vision-tensor-parallel must be one of {PLACEMENTS}, got {choice!r}")
    placement = {}
    for name in ENCODERS:
        divides = _heads_divide(config, name, tp)
        if tp == 1:
            placement[name] = "heads"  # nothing to split
        elif choice == "images" or (choice == "auto" and (not divides or _images_cheaper(config, name, tp,
                                                                                          images_per_step))):
            placement[name] = "images"
        else:
            placement[name] = "heads" if divides else "replicated"
    return placement


def _heads_divide(config: ModelConfig, name: str, tp: int) -> bool:
    if name == "visual":
        return config.vision.heads % tp == 0 and config.vision.mlp_dim % tp == 0
    return config.causal_former.heads % tp == 0 and config.causal_former.ffn_dim % tp == 0


def tp_traffic(config: ModelConfig, name: str, images: float, act_bytes: int = 2) -> dict[str, float]:
    """Bytes over TP of encoder `name` for `images` images, by placement: `heads`, its blocks'
    activations all-reduced (2 forward, 2 backward per block); `images_gather`, its outputs
    gathered; `images_grads`, its fp32 gradients all-reduced (once a step, whatever `images`)."""
    params = encoder_parameters(config, name)
    if name == "visual":
        v = config.vision
        tokens, width, blocks = v.num_tokens, v.width, v.layers
        out_tokens, out_width = tokens, width
    else:
        c = config.causal_former
        tokens, width, blocks = c.num_query_tokens, c.d_model, c.layers
        out_tokens, out_width = c.num_query_tokens, config.llm.hidden
    return dict(heads=images * blocks * 4 * tokens * width * act_bytes,
                images_gather=images * out_tokens * out_width * act_bytes, images_grads=4 * params)


@cached
def encoder_parameters(config: ModelConfig, name: str) -> int:
    """Exact parameter count of encoder `name`, counted once per config on the meta device."""
    with torch.device("meta"):
        module = EVAVisionTransformer(config.vision) if name == "visual" else \
            CausalFormer(config.causal_former, visual_dim=config.vision.width, llm_hidden=config.llm.hidden)
    return sum(p.numel() for p in module.parameters())


def _images_cheaper(config: ModelConfig, name: str, tp: int, images_per_step: float) -> bool:
    """Bytes over TP per step, bf16 activations: heads-split all-reduces against one fp32
    gradient all-reduce of the module plus the gather of its outputs. Ring all-reduce moves
    2 (T-1)/T of a buffer, all-gather (T-1)/T."""
    ring, gather = 2 * (tp - 1) / tp, (tp - 1) / tp
    traffic = tp_traffic(config, name, images_per_step)
    return traffic["images_grads"] * ring + traffic["images_gather"] * gather < traffic["heads"] * ring


def apply_image_split(part: nn.Module, tp_group: dist.ProcessGroup, placement: dict[str, str]) -> None:
    """Hooks that split the images of `part` (a whole Emu or its first pipeline stage) across
    the TP ranks for every encoder placed on `images`; a no-op without one."""
    split = [name for name in ENCODERS if placement.get(name) == "images"]
    if part.visual is None or not split:
        return
    first = part.visual if split[0] == "visual" else part.causal_former
    # After the ViT alone, gather after its final norm (the Causal Former reads that).
    last = part.causal_former if split[-1] == "causal_former" else part.ln_visual
    count = {}

    def take_share(module, args):
        count["n"] = args[0].shape[0]
        return (ShareImages.apply(args[0], tp_group), *args[1:])

    def gather(module, args, output):
        return GatherImages.apply(output, count.pop("n"), tp_group)

    first.register_forward_pre_hook(take_share)
    last.register_forward_hook(gather)
    modules = [part.visual, part.ln_visual] if "visual" in split else []
    _SPLIT_MODULES[part] = modules + ([part.causal_former] if "causal_former" in split else [])


class ShareImages(torch.autograd.Function):
    """This TP rank's ceil(N / T) of the N images (pixels, or the ViT's output when only the
    Causal Former is split), padded with copies of the last image so that every rank encodes
    as many (the copies' outputs are dropped by the gather and get no gradient). Backward
    all-gathers the shares' gradients: a heads-split ViT before it needs the gradient of
    every image on every rank."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        n, size, rank = images.shape[0], dist.get_world_size(group), dist.get_rank(group)
        per_rank = math.ceil(n / size)
        share = images[rank * per_rank:(rank + 1) * per_rank]
        ctx.n, ctx.group = n, group
        # A copy of the share alone, not a view of all N images: the encoder saves its input
        # for backward, and a view would keep every image's pixels alive until then.
        return torch.cat([share, images[-1:].expand(per_rank - share.shape[0], *images.shape[1:])])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group)[:ctx.n], None


def _all_gather(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


class GatherImages(torch.autograd.Function):
    """All-gather each TP rank's encoded images along dim 0, dropping the padding. Backward
    keeps this rank's rows: the gradient arriving here is the same on every TP rank (the
    LLM's TP regions reduce theirs), so no communication is needed."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rank, ctx.per_rank = dist.get_rank(group), local.shape[0]
        return _all_gather(local, group)[:n]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo = ctx.rank * ctx.per_rank
        local = grad.new_zeros((ctx.per_rank, *grad.shape[1:]))
        mine = grad[lo:lo + ctx.per_rank]
        local[:mine.shape[0]] = mine
        return local, None, None


@torch.no_grad()
def reduce_image_split_grads(parts: list[nn.Module], tp_group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of image-split modules over TP (each rank saw its own images).
    Under FSDP2 each gradient is this DP rank's shard, the same slice on every TP rank."""
    for part in parts:
        for module in _SPLIT_MODULES.get(part, []):
            for p in module.parameters():
                if p.grad is not None:
                    grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    dist.all_reduce(grad, group=tp_group)
