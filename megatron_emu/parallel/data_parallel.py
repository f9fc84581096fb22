"""Data parallelism with FSDP2 (`fully_shard`), gradient-sync control, global grad-norm clipping.

- fsdp: ZeRO-3 over the whole DP group (parameters, gradients, optimizer state sharded).
- hsdp: shard inside groups of DP / replicas ranks, replicate across the replicas.
- ddp:  the same machinery with a shard group of 1: full replicas, gradients all-reduced
  (bucketed per block, overlapped with backward). It composes with DTensor TP
  parameters, which torch's DistributedDataParallel does not.
Each transformer block is its own FSDP unit so communication overlaps compute.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megatron_emu.model.lora import is_lora_parameter
from megatron_emu.parallel.image_split import reduce_image_split_grads
from megatron_emu.parallel.mesh import ParallelMesh


def apply_data_parallel(part: nn.Module, pmesh: ParallelMesh, compute_dtype: torch.dtype = torch.float32,
                        per_block: bool = True) -> None:
    """Wrap one model part in place; a no-op when DP is 1. Under --bf16 / --fp16
    (`compute_dtype`) FSDP2 gathers parameters in it for compute and reduce-scatters
    gradients in fp32; the sharded parameters (the optimizer's master weights) stay fp32.
    per_block False (--no-overlap-grad-reduce): the part is one unit, whose gradients are
    reduced only once its whole backward is done."""
    if pmesh.dims.dp == 1:
        return
    mesh = pmesh.sharding_mesh()
    # With pipelining a block runs once per micro-batch: keep it gathered between
    # forward and backward instead of all-gathering it twice per micro-batch.
    reshard = pmesh.dims.pp == 1
    mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    for blocks in part.transformer_stacks().values() if per_block else ():
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(part, **kwargs)


def gradient_sync(parts: list[nn.Module], enabled: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: reduce only on the last micro-batch (no redundant all-reduce)."""
    for part in parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


@torch.no_grad()
def reduce_partial_grads(parts: list[nn.Module], pmesh: ParallelMesh) -> None:
    """Sum the sequence-parallel norms' weight gradients over TP (each TP rank saw S/TP tokens),
    the replicated halves of LoRA adapters (parallel/lora.py), and the image encoders whose
    images are split across TP (parallel/image_split.py).

    Plain TP leaves them as Partial DTensors: redistribute to the parameter's placement
    (one all-reduce over TP). Under FSDP2/DDP (fully_shard) nothing is left to do: FSDP2
    redistributes a Partial gradient to the parameter's TP placement itself before its
    reduce-scatter over DP, so reducing again here would double it (the parity tests
    TP2+SP x DP2 FSDP2 and TP2+SP x PP2 x DP2 check this).
    """
    if pmesh.dims.tp == 1:
        return
    reduce_image_split_grads(parts, pmesh.tp_mesh.get_group())
    for part in parts:
        for name, p in part.named_parameters():
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                if not (is_sequence_parallel_norm(name) or is_lora_parameter(name)):  # LoRA: parallel/lora.py
                    raise RuntimeError(f"{name}: unexpected Partial gradient {g.placements}")
                p.grad = g.redistribute(g.device_mesh, p.placements)


def is_sequence_parallel_norm(name: str) -> bool:
    """The norms tensor_parallel.py runs as SequenceParallel (LLaMA's, on S/TP tokens)."""
    return name.startswith("llm.") and name.endswith(("attention_norm.weight", "ffn_norm.weight", "llm.norm.weight"))


def replication_factor(param: torch.Tensor, pmesh: ParallelMesh) -> int:
    """On how many ranks of one pipeline stage (DP x TP of them) this tensor's values repeat."""
    group_size = pmesh.dims.dp * pmesh.dims.tp
    if not isinstance(param, DTensor):
        return group_size
    distinct = 1
    for size, placement in zip(param.device_mesh.shape, param.placements):
        if placement.is_partial():
            raise RuntimeError(f"gradient still Partial on {param.device_mesh}: reduce it before its norm")
        # Every non-Replicate placement splits the values, including the _StridedShard
        # FSDP2 puts on a TP-column-sharded dim (whose is_shard() is False).
        if not placement.is_replicate():
            distinct *= size
    return group_size // distinct


@torch.no_grad()
def clip_grad_norm_global(parts: list[nn.Module], max_norm: float, pmesh: ParallelMesh) -> float:
    """Global L2 norm of all gradients over every parallel group; scales them to max_norm.

    Each rank sums the squares of its local shards, divided by how often those values
    repeat (replicas over DP/TP), and one all-reduce over the world adds the stages.
    """
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    local = torch.zeros((), dtype=torch.float64, device=pmesh.device)
    for g in grads:
        local += squared_norm(g.to_local() if isinstance(g, DTensor) else g) / replication_factor(g, pmesh)
    all_reduce_if_distributed(local)
    norm = float(local.sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s epsilon
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return norm


def all_reduce_if_distributed(tensor: torch.Tensor) -> None:
    """Sum over the world; one process has nothing to add (and a gloo all-reduce with
    itself still hands the tensor to its thread and back: ~1-3% of a tiny CPU step)."""
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor)


def squared_norm(shard: torch.Tensor) -> torch.Tensor:
    """Sum of squares of one gradient shard, as a float64 scalar, without a float64 copy.

    The norm of each row (last dim) is taken in the gradient's dtype (at least fp32),
    then the rows' squares are added in fp64: ~1e-7 relative (one fp32 rounding per
    row), at the cost of one read. A float64 copy, squared, cost more than the matmuls
    of a 1b-width step on CPU; one fp32 norm over a whole large tensor (torch's
    clip_grad_norm_ on CPU) is ~1e-3 off.
    """
    rows = shard.reshape(1) if shard.dim() == 0 else shard
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return torch.linalg.vector_norm(rows, dim=-1, dtype=dtype).double().pow(2).sum()
