"""The one way to build a run: what a training step needs, in a fixed order.

    init_distributed -> ParallelDims (validated) -> DeviceMesh (pp, dp, tp)
    -> attention backend -> Precision -> model (meta, pipeline split, TP, LoRA, fused norms,
       recompute, compile, FSDP/DDP, materialised: parallel/parallelize.py) -> AdamW

Pretraining (train.py), the throughput benchmark (tools/benchmark_throughput.py) and the
parallel tests all call `build_run`. One process is a mesh of size 1 (parallel/mesh.py),
so a single process builds, steps and clips through the same code as 8 ranks do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_emu.config import TrainConfig
from megatron_emu.model.attention import configure_attention
from megatron_emu.model.emu import build_emu
from megatron_emu.parallel.image_split import choose_placement
from megatron_emu.parallel.mesh import ParallelDims, ParallelMesh, build_mesh, init_distributed
from megatron_emu.parallel.parallelize import ParallelModel, parallelize_emu
from megatron_emu.training.instruct import lora_spec
from megatron_emu.training.optim import apply_freezing, build_optimizer
from megatron_emu.training.precision import Precision
from megatron_emu.training.step import emu_objective

log = logging.getLogger("megatron_emu")


@dataclass
class Run:
    """This rank's share of one run: layout, kernels, precision, model parts, optimizer."""

    config: TrainConfig
    dims: ParallelDims
    pmesh: ParallelMesh
    n_micro: int  # micro-batches per step on each data-parallel rank
    attention: str  # the attention backend chosen (model/attention.py)
    precision: Precision
    pmodel: ParallelModel
    optimizer: torch.optim.Optimizer

    @property
    def device(self) -> torch.device:
        return self.pmesh.device

    def close(self) -> None:
        """End the one-rank process group of a single process (parallel/mesh.py)."""
        self.pmesh.close()


def build_run(config: TrainConfig) -> Run:
    """Every size checked before any work; then the mesh, the kernels and the model parts of
    this rank (built on the meta device: no rank ever holds the whole model) and its AdamW."""
    timeout = timedelta(minutes=config.parallel.distributed_timeout_minutes)
    world_size, device = init_distributed(config.device, timeout)
    dims = ParallelDims.from_config(config.parallel, world_size, config.model, config.data.seq_length)
    n_micro = dims.validate(config.model, config.data)
    if config.performance.fp16 and dims.pp > 1:
        raise ValueError("--fp16 loss scaling is not supported with pipeline parallelism; use --bf16")
    pmesh = build_mesh(dims, device, timeout)
    try:
        perf = config.performance
        attention = configure_attention(perf.attention_backend, device.type, perf.use_flash_attn)
        precision = Precision(perf, device.type)
        torch.manual_seed(config.seed)
        pmodel = build_model(config, pmesh, n_micro, precision.dtype)
        optimizer = build_optimizer(pmodel.parts, config.optimizer, perf.fused_kernels, device.type)
    except BaseException:
        pmesh.close()
        raise
    return Run(config, dims, pmesh, n_micro, attention, precision, pmodel, optimizer)


def build_model(config: TrainConfig, pmesh: ParallelMesh, n_micro: int,
                compute_dtype: torch.dtype = torch.float32) -> ParallelModel:
    """Emu on the meta device, frozen per --freeze-*, then this rank's parts (parallelize.py):
    split into pipeline stages, sharded, adapted (LoRA), materialised with the values of the
    single-process build_emu(config.seed)."""
    full = build_emu(config.model, device="meta")
    apply_freezing(full, config.optimizer)
    return parallelize_emu(full, pmesh, n_micro, emu_objective(config), config.seed, config.performance,
                           lora_spec(config), compute_dtype, vision_placement(config, pmesh.dims),
                           config.parallel.overlap_grad_reduce)


def vision_placement(config: TrainConfig, dims: ParallelDims) -> dict[str, str]:
    """--vision-tensor-parallel resolved per image encoder (parallel/image_split.py)."""
    images_per_step = config.data.global_batch_size / dims.dp * config.parallel.pipeline_balance_images_per_sample
    placement = choose_placement(config.parallel.vision_tensor_parallel, config.model, dims.tp, images_per_step)
    if dims.tp > 1:
        log.info("image encoders under TP=%d: ViT %s, Causal Former %s", dims.tp, placement["visual"],
                 placement["causal_former"])
    return placement
