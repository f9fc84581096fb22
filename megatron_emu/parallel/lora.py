"""LoRA adapters under tensor parallelism, split consistently with their base's plan.

y = W x + s B A x. A column-parallel base (q, k, v: W split along its output rows)
keeps A whole on every rank and splits B along its output rows too, so each rank
computes exactly its own output columns. A row-parallel base (o: W split along its
input columns) splits A along its input columns, like W; A x is then a partial sum
over TP, reduced (with B whole) into the base's output layout: replicated, or
sequence-sharded with --sequence-parallel. DTensor carries out both, forward and
backward; a replicated A (or B) sees a partial gradient on each rank, which
data_parallel.reduce_partial_grads (or FSDP2) sums over TP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from megatron_emu.model.lora import lora_layers

ROW_PARALLEL_TARGETS = ("attention.wo",)


def lora_placements(name: str, sequence_parallel: bool) -> tuple:
    """(A, B, update) placements for the adapter of the base Linear `name`."""
    if name.endswith(ROW_PARALLEL_TARGETS):
        return Shard(1), Replicate(), Shard(1) if sequence_parallel else Replicate()
    return Replicate(), Shard(0), Shard(-1)


def shard_lora(part: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Distribute every adapter of `part` over `tp_mesh` (after apply_lora, after the base's TP plan)."""
    for name, linear in lora_layers(part).items():
        lora = linear.lora
        a, b, update = lora_placements(name, sequence_parallel)
        lora.lora_A = nn.Parameter(distribute_tensor(lora.lora_A.detach(), tp_mesh, [a]))
        lora.lora_B = nn.Parameter(distribute_tensor(lora.lora_B.detach(), tp_mesh, [b]))
        lora.output_placement = update
        if isinstance(lora.dropout, nn.Dropout):  # --lora-dropout > 0
            lora.dropout = GlobalMaskDropout(lora.dropout.p)


class GlobalMaskDropout(nn.Module):
    """Dropout of an adapter's DTensor input with the mask one process would draw for the
    whole tensor: every TP rank draws that mask from the same RNG stream (seeded alike) and
    keeps its own shard. The o projection's input is split over heads (Shard(-1)); DTensor's
    dropout draws a shard-sized mask per rank off CUDA, so each shard repeated the same
    pattern. Same arithmetic as torch's CPU dropout: input * (bernoulli(1 - p) / (1 - p))."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not isinstance(x, DTensor):
            return nn.functional.dropout(x, self.p, self.training)
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        # src_data_rank=None: each rank cuts its shard from its own (identical) copy, no communication.
        return x * distribute_tensor(keep, x.device_mesh, x.placements, src_data_rank=None)
