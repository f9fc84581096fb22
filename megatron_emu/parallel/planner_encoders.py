"""Planner, encoder side of the step time: what the ViT and the Causal Former cost the first
stage's TP rank under their placement (image_split.choose_placement, as training/build.py
resolves --vision-tensor-parallel).

- heads: each block's matmuls split over TP (1/TP of the FLOPs), and like a LLaMA layer
  two all-reduces of the block's activations forward and two backward, per micro-batch;
- images: each rank encodes its ceil(images / TP) of the micro-batch's images with the
  whole module, then one all-gather of the outputs; after backward, one fp32 all-reduce of
  the module's gradients over TP per step (each rank saw other images);
- replicated (heads TP does not divide, --vision-tensor-parallel heads): every TP rank
  encodes every image: no communication, no division.

The FLOPs of the two encoders are told apart by their forward FLOPs (model/flops.py);
recompute adds to both in about that proportion.
"""

from __future__ import annotations

from megatron_emu.config import ModelConfig
from megatron_emu.model import flops as flops_model
from megatron_emu.parallel.image_split import tp_traffic
from megatron_emu.parallel.planner_parameters import parameter_counts

ENCODERS = ("visual", "causal_former")


def encoder_shares(model: ModelConfig) -> dict[str, float]:
    """Each encoder's part of the encoders' forward FLOPs per image."""
    vision = flops_model.patch_embed_flops(model) + model.vision.layers * flops_model.vision_block_flops(model).total
    former = (model.causal_former.layers * flops_model.causal_former_block_flops(model).total
              + flops_model.causal_former_proj_flops(model))
    return {"visual": vision / (vision + former), "causal_former": former / (vision + former)}


def encoder_rank_flops(model: ModelConfig, encoders_flops: float, images: float, tp: int,
                       placement: dict[str, str]) -> float:
    """FLOPs one TP rank spends in the encoders of a micro-batch whose encoders cost
    `encoders_flops` in all, over `images` images."""
    shares, total = encoder_shares(model), 0.0
    for name in ENCODERS:
        if placement[name] == "heads":
            fraction = 1 / tp
        elif placement[name] == "images":
            fraction = -(-images // tp) / images if images else 0.0
        else:  # replicated
            fraction = 1.0
        total += encoders_flops * shares[name] * fraction
    return total


def encoder_parameters_per_rank(model: ModelConfig, tp: int, placement: dict[str, str]) -> float:
    """The encoders' parameters one TP rank holds: 1/TP of a head-split one's blocks, all of the others."""
    counts = parameter_counts(model)
    blocks = {"visual": model.vision.layers * counts["vision_block"],
              "causal_former": model.causal_former.layers * counts["cf_block"]}
    whole = sum(n for name, n in blocks.items() if placement[name] != "heads")
    return (counts["encoder"] - whole) / tp + whole


def encoder_tp_bytes(model: ModelConfig, images: float, act_bytes: int, placement: dict[str, str]) -> dict[str, float]:
    """Bytes over TP for one micro-batch: `allreduce` (heads-split blocks) and `gather`
    (image-split outputs), and `step_allreduce` (image-split gradients, fp32, once a step;
    the caller divides it by the FSDP shard count). The same accounting as the trainer's
    --vision-tensor-parallel auto (image_split.tp_traffic)."""
    out = dict(allreduce=0.0, gather=0.0, step_allreduce=0.0)
    for name in ENCODERS:
        traffic = tp_traffic(model, name, images, act_bytes)
        if placement[name] == "heads":
            out["allreduce"] += traffic["heads"]
        elif placement[name] == "images":
            out["gather"] += traffic["images_gather"]
            out["step_allreduce"] += traffic["images_grads"]
    return out
