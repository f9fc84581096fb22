"""Pipeline stages balanced by cost (--pipeline-balance auto).

An even split of the LLaMA layers leaves Emu's first stage the slowest: besides its
layers it runs EVA-CLIP and the Causal Former on every image of the micro-batch (for
emu-14b at 2 images per sample, about 1.6 LLaMA layers of compute), and the last stage
runs the LM head over a 32k vocabulary. A 1F1B pipeline moves at the pace of its slowest
stage, so the split that matters is the one whose costliest stage is cheapest.

Megatron users place the ends by hand (--decoder-first/last-pipeline-num-layers); here
the split is chosen from the FLOPs model of model/flops.py, the same one that the
planner and the MFU figures use, or, with --pipeline-balance-costs FILE, from per-block
times measured at the run's shapes (block_costs.py), which see what FLOPs do not: blocks
that run below matmul efficiency.
"""

from __future__ import annotations

from typing import Callable

from megatron_emu.config import ModelConfig
from megatron_emu.model import flops
from megatron_emu.parallel import block_costs

StageCost = Callable[[int, bool, bool], float]  # (LLaMA layers, is first, is last) -> cost


def emu_stage_cost(model: ModelConfig, seq_length: int, images_per_sample: float, costs_file: str = "") -> StageCost:
    """Forward + backward FLOPs of one sample through a stage (micro-batch size cancels out),
    or its measured seconds when `costs_file` (--pipeline-balance-costs) is given."""
    if costs_file:
        seconds = block_costs.load_costs(costs_file, model, seq_length)
        return block_costs.measured_stage_cost(seconds, model, images_per_sample)

    def cost(layers: int, first: bool, last: bool) -> float:
        return flops.stage_flops(model, 1, seq_length, images_per_sample, layers, first, last)
    return cost


def balanced_stage_layers(num_layers: int, num_stages: int, cost: StageCost) -> tuple[int, ...]:
    """LLaMA layers per stage (each >= 1) minimising the costliest stage.

    Only the ends differ from a plain LLaMA layer, so the middle stages share what is
    left as evenly as possible and the search runs over the two end counts. Ties go to
    the flatter split (costs compared largest first), then to the earlier candidate.
    """
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"{num_layers} LLaMA layers cannot give each of {num_stages} pipeline stages one")
    if num_stages == 1:
        return (num_layers,)
    middle = num_stages - 2
    best, best_key = None, None
    for first in range(1, num_layers - middle):
        lasts = [num_layers - first] if middle == 0 else range(1, num_layers - first - middle + 1)
        for last in lasts:
            layers = (first, *even_split(num_layers - first - last, middle), last)
            costs = [cost(n, s == 0, s == num_stages - 1) for s, n in enumerate(layers)]
            key = sorted(costs, reverse=True)
            if best_key is None or key < best_key:
                best, best_key = layers, key
    return best


def even_split(layers: int, stages: int) -> tuple[int, ...]:
    """`layers` over `stages` stages, the earlier ones taking the remainder."""
    if stages == 0:
        return ()
    per, extra = divmod(layers, stages)
    return tuple(per + (s < extra) for s in range(stages))
