"""Turn one Emu into this rank's parallel model parts, in a fixed order:
pipeline split -> materialise -> tensor parallel -> data parallel (FSDP2) -> schedule.

(Activation recompute and torch.compile, when added, go between TP and FSDP.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_emu.model.emu import Emu
from megatron_emu.parallel.data_parallel import apply_data_parallel
from megatron_emu.parallel.mesh import ParallelMesh
from megatron_emu.parallel.pipeline import EmuPipeline, MicrobatchFeed, split_stage, stage_indices
from megatron_emu.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger("megatron_emu")


@dataclass
class ParallelModel:
    """What one rank trains: its model parts (the whole Emu without PP, else its stages)."""

    parts: list[nn.Module]
    pmesh: ParallelMesh | None = None
    schedule: EmuPipeline | None = None  # this rank's pipeline stages and schedule, with PP
    feed: MicrobatchFeed | None = None
    # (lm, l2) of each micro-batch whose loss this rank computed, for logging.
    losses: list[tuple[float, float]] = field(default_factory=list)

    @property
    def computes_loss(self) -> bool:
        """True where the loss is computed: every rank without PP, the last stage's ranks with it."""
        return self.schedule is None or any(getattr(p, "is_last", False) for p in self.parts)

    def named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()


def parallelize_emu(full: Emu, pmesh: ParallelMesh, n_micro: int, loss_fn, seed: int) -> ParallelModel:
    """`full` is either initialised (every rank the same: tests, checkpoint loading) or on
    the meta device, in which case each rank materialises and initialises only its stages."""
    dims = pmesh.dims
    feed = None
    if dims.pp > 1:
        feed = MicrobatchFeed()
        stages = stage_indices(pmesh)
        parts = [split_stage(full, s, dims.stage_layers, feed) for s in stages]
    else:
        stages, parts = [0], [full]
    for part in parts:
        materialise(part, pmesh.device, seed)
        if dims.tp > 1:
            apply_tensor_parallel(part, pmesh.tp_mesh, full.config, dims.sequence_parallel)
        apply_data_parallel(part, pmesh)
    schedule = EmuPipeline(parts, stages, pmesh, n_micro, loss_fn, feed) if dims.pp > 1 else None
    log.info("rank %d: %s; stages %s", torch.distributed.get_rank(), dims.describe(), stages)
    return ParallelModel(parts, pmesh, schedule, feed)


def materialise(part: nn.Module, device: torch.device, seed: int) -> None:
    """Move to `device`; a meta-device part is allocated there and initialised.

    Every rank of a stage initialises the whole stage from the same seed before it is
    sharded, so replicated parameters agree across TP/DP ranks without a broadcast.
    """
    on_meta = any(p.is_meta for p in part.parameters())
    if not on_meta:
        part.to(device)
        return
    part.to_empty(device=device)
    torch.manual_seed(seed)
    part.init_weights()  # Emu.init_weights, or EmuStage's for the parts a stage holds
