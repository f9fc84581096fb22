"""Turn one Emu into this rank's parallel model parts, in a fixed order:
pipeline split -> tensor parallel -> LoRA adapters -> fused norms -> activation recompute -> torch.compile
-> data parallel (FSDP2 / DDP) -> materialise -> schedule.

A model built on the meta device is sharded before anything is allocated: each rank then
allocates only its own shards and initialises them one parameter at a time
(model/init.py), so no rank ever holds its whole stage, let alone the model, unsharded.

Why this order: recompute wraps the blocks TP has already sharded (the recomputed
forward replays the TP collectives), compile sees the checkpointed blocks, and FSDP2
comes last so its unshard/reshard hooks sit outside the checkpoint and the compiled
region (torchtitan's order). Fused norms only swap a norm's `forward`, so they are
order-free; they go after TP so the kernel choice can see which weights are DTensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from megatron_emu.config import PerformanceConfig
from megatron_emu.kernels import apply_fused_norms
from megatron_emu.model.emu import Emu
from megatron_emu.model.init import init_parameters
from megatron_emu.model.lora import LoRASpec, apply_lora
from megatron_emu.parallel.activation_checkpoint import apply_recompute_and_compile
from megatron_emu.parallel.data_parallel import apply_data_parallel
from megatron_emu.parallel.lora import shard_lora
from megatron_emu.parallel.mesh import ParallelMesh
from megatron_emu.parallel.pipeline import EmuPipeline, MicrobatchFeed, split_stage, stage_indices
from megatron_emu.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger("megatron_emu")


@dataclass
class ParallelModel:
    """What one rank trains: its model parts (the whole Emu without PP, else its stages),
    on the mesh every run has (one process: a mesh of size 1)."""

    parts: list[nn.Module]
    pmesh: ParallelMesh
    schedule: EmuPipeline | None = None  # this rank's pipeline stages and schedule, with PP

    @property
    def computes_loss(self) -> bool:
        """True where the loss is computed: every rank without PP, the last stage's ranks with it."""
        return self.schedule is None or any(p.is_last for p in self.parts)

    def named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()


def parallelize_emu(full: Emu, pmesh: ParallelMesh, n_micro: int, objective, seed: int,
                    performance: PerformanceConfig | None = None, lora: LoRASpec | None = None,
                    compute_dtype: torch.dtype = torch.float32,
                    vision_placement: dict[str, str] | None = None, overlap_grad_reduce: bool = True) -> ParallelModel:
    """`full` is either initialised (every rank the same: tests, checkpoint loading) or on
    the meta device, in which case each rank materialises and initialises only its stages.
    `objective(outputs, batch) -> EmuLoss`: the loss the last pipeline stage computes (PP only).
    `performance` (--recompute-*, --compile, fused kernels); None: none of them.
    `compute_dtype` (--bf16 / --fp16, the trainer's Precision): what pipeline stages send
    each other and what FSDP2 gathers parameters in; master weights stay fp32.
    `lora`: freeze the base and adapt the LLM's q, k, v, o (model/lora.py); adapters of an
    initialised `full` start from the single-process values (init by name), like the base.
    `vision_placement`: TP placement of the image encoders (image_split.choose_placement).
    `overlap_grad_reduce` False (--no-overlap-grad-reduce): one FSDP2 unit per part."""
    performance = performance or PerformanceConfig(fused_kernels=False)
    dims = pmesh.dims
    if dims.pp > 1:
        feed = MicrobatchFeed()  # the step's micro-batches, read by stage 0 and the loss
        stages = stage_indices(pmesh)
        parts = [split_stage(full, s, dims.stage_layers, feed, io_dtype=compute_dtype) for s in stages]
    else:
        stages, parts = [0], [full]
    on_meta = any(p.is_meta for p in full.parameters())
    for part in parts:
        if not on_meta:
            part.to(pmesh.device)
        if dims.tp > 1:
            apply_tensor_parallel(part, pmesh.tp_mesh, full.config, dims.sequence_parallel, vision_placement)
        if lora is not None:
            # After TP: its plans would shard the adapters as if they were the base's own weights.
            init_adapters(part, apply_lora(part, lora), full.config.init_std, seed, on_meta)
            if dims.tp > 1:
                shard_lora(part, pmesh.tp_mesh, dims.sequence_parallel)
        if performance.fused_kernels:
            apply_fused_norms(part, pmesh.device.type)
        apply_recompute_and_compile(part, performance)
        apply_data_parallel(part, pmesh, compute_dtype, per_block=overlap_grad_reduce)
        if on_meta:
            materialise(part, pmesh.device, seed)
    schedule = EmuPipeline(parts, stages, pmesh, n_micro, objective) if dims.pp > 1 else None
    log.info("rank %d: %s; stages %s", pmesh.rank, dims.describe(), stages)
    return ParallelModel(parts, pmesh, schedule)


def materialise(part: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a sharded meta-device part on `device` (each rank its own shards) and
    initialise it: the values of the single-process build_emu(seed), sharded."""
    part.to_empty(device=device)
    part.init_weights(seed)  # Emu.init_weights (a stage: the parts it holds)


def init_adapters(part: nn.Module, names: list[str], std: float, seed: int, on_meta: bool) -> None:
    """New adapters of an initialised part get their values now (a meta part: at materialise)."""
    if not on_meta:
        init_parameters(part, std, seed, set(names))
