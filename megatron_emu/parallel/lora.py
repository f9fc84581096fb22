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

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

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
