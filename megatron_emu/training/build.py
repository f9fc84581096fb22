"""The one way to build a run: what a training step needs, in a fixed order.

    init_distributed -> ParallelDims (validated) -> DeviceMesh (pp, dp, tp)
    -> attention backend -> Precision -> model (meta, pipeline split, TP, LoRA, fused norms,
       recompute, compile, FSDP/DDP, materialised: parallel/parallelize.py) -> AdamW

Pretraining (train.py), the throughput benchmark (tools/benchmark_throughput.py) and the
parallel tests all call `build_run`; inference (generation/inference.py `build_inference`:
generation, evaluation, the decoder's frozen Emu) starts from the same `build_layout`. One
process is a mesh of size 1 (parallel/mesh.py), so a single process builds, steps and clips
through the same code as 8 ranks do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_emu.config import DataConfig, ModelConfig, ParallelConfig, PerformanceConfig, TrainConfig
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
class RunLayout:
    """What every run, training or inference, starts from: the validated sizes, the mesh,
    the attention backend and the precision."""

    dims: ParallelDims
    pmesh: ParallelMesh
    n_micro: int  # micro-batches per step on each data-parallel rank (inference: 1)
    attention: str  # the attention backend chosen (model/attention.py)
    precision: Precision


class OnLayout:
    """A run built on a RunLayout (`self.layout`): its fields, its device, and its close."""

    layout: RunLayout

    @property
    def dims(self) -> ParallelDims:
        return self.layout.dims

    @property
    def pmesh(self) -> ParallelMesh:
        return self.layout.pmesh

    @property
    def n_micro(self) -> int:
        return self.layout.n_micro

    @property
    def attention(self) -> str:
        return self.layout.attention

    @property
    def precision(self) -> Precision:
        return self.layout.precision

    @property
    def device(self) -> torch.device:
        return self.layout.pmesh.device

    def close(self) -> None:
        """End the one-rank process group of a single process (parallel/mesh.py)."""
        self.layout.pmesh.close()


@dataclass
class Run(OnLayout):
    """This rank's share of one training run: layout, model parts, optimizer."""

    config: TrainConfig
    layout: RunLayout
    pmodel: ParallelModel
    optimizer: torch.optim.Optimizer


def build_run(config: TrainConfig) -> Run:
    """Every size checked before any work; then the mesh, the kernels and the model parts of
    this rank (built on the meta device: no rank ever holds the whole model) and its AdamW."""
    layout = build_layout(config.parallel, config.performance, config.model, config.device, config.data)
    try:
        torch.manual_seed(config.seed)
        pmodel = build_model(config, layout.pmesh, layout.n_micro, layout.precision.dtype)
        optimizer = build_optimizer(pmodel.parts, config.optimizer, config.performance.fused_kernels,
                                    layout.pmesh.device.type)
    except BaseException:
        layout.pmesh.close()
        raise
    return Run(config, layout, pmodel, optimizer)


def build_layout(parallel: ParallelConfig, performance: PerformanceConfig, model: ModelConfig, device_name: str,
                 data: DataConfig | None = None) -> RunLayout:
    """init_distributed -> ParallelDims (validated against the model, and the batch when
    `data` is given: training) -> mesh -> attention backend -> Precision. The first half of
    build_run, and of generation/inference.py's build_inference."""
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    world_size, device = init_distributed(device_name, timeout)
    dims = ParallelDims.from_config(parallel, world_size, model, data.seq_length if data is not None else None)
    if data is not None:
        n_micro = dims.validate(model, data)
    else:
        dims.validate_model(model)
        n_micro = 1
    if performance.fp16 and dims.pp > 1:
        raise ValueError("--fp16 loss scaling is not supported with pipeline parallelism; use --bf16")
    pmesh = build_mesh(dims, device, timeout)
    try:
        attention = configure_attention(performance.attention_backend, device.type, performance.use_flash_attn)
        precision = Precision(performance, device.type)
    except BaseException:
        pmesh.close()
        raise
    return RunLayout(dims, pmesh, n_micro, attention, precision)


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
