"""The one way to build a frozen Emu for inference: generation, evaluation, image generation and
the decoder's conditions (tools/generate_text.py, tools/evaluate.py, tools/generate_image.py,
decoder/train.py) all call `build_inference`.

    the model config (and later the weights: any form generation/loading.py reads; the
    decoder's --emu-load: loading.py load_emu)
    -> training/build.py build_layout: init_distributed -> ParallelDims (tp, pp, dp from the
       world size, validated against the model) -> mesh -> attention backend -> Precision
    -> this rank's part: its pipeline stage (parallel/pipeline.py prune_to_stage), on its
       device in the compute dtype, TP-sharded with training's plans (no sequence parallelism),
       frozen; no FSDP / DDP, no optimizer.

One process is a mesh of size 1, as in training. The model config comes first (the layout
needs its layers and heads): our checkpoint of a whole Emu and an HF export record it, a
state-dict file takes the preset's; from these each rank then reads only its part's tensors
(adapters: its part of the base and of the adapters, merged), in its shards and compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_emu.config import ModelConfig, ParallelConfig, PerformanceConfig
from megatron_emu.generation.forward import shard_for_inference
from megatron_emu.generation.frozen import freeze
from megatron_emu.generation.loading import adapted_on_base, load_emu, load_for_inference, read_part
from megatron_emu.generation.stage_links import StageLinks
from megatron_emu.generation.weight_sources import is_adapters, partial_source
from megatron_emu.model.emu import Emu
from megatron_emu.parallel.pipeline import prune_to_stage
from megatron_emu.training.build import OnLayout, RunLayout, build_layout


@dataclass
class InferenceConfig:
    load: str = ""  # our checkpoint (any layout), adapters, an HF export or a state-dict file
    preset: str = "tiny"  # the model size of a state-dict file
    base: str = ""  # adapters: their base (default: the one they record)
    tokenizer_model: str = ""  # adapters: the words of [USER] / [ASSISTANT]
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    device: str = "auto"
    bf16: bool = False
    attention_backend: str = "auto"
    # The decoder's --emu-load: an Emu of this config from our checkpoint or a state-dict file
    # (loading.py load_emu; empty `load`: random weights, for smoke runs).
    model: ModelConfig | None = None


@dataclass
class InferenceRun(OnLayout):
    """This rank's share of an inference run."""

    layout: RunLayout
    emu: Emu  # this rank's frozen part: the whole Emu, or its pipeline stage; TP-sharded
    links: StageLinks | None  # pipeline neighbours (None without PP)

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype


def build_inference(config: InferenceConfig) -> InferenceRun:
    weights = Weights(config)
    parallel = ParallelConfig(tensor_model_parallel_size=config.tensor_model_parallel_size,
                              pipeline_model_parallel_size=config.pipeline_model_parallel_size)
    performance = PerformanceConfig(attention_backend=config.attention_backend, fused_kernels=False, bf16=config.bf16)
    layout = build_layout(parallel, performance, weights.config, config.device)
    try:
        emu = frozen_part(weights, layout)
        links = StageLinks(layout.pmesh.pp_mesh, layout.pmesh.device) if layout.dims.pp > 1 else None
    except BaseException:
        layout.pmesh.close()
        raise
    return InferenceRun(layout, emu, links)


class Weights:
    """Where the run's weights come from. From our checkpoint of a whole Emu and an HF export
    (their model config recorded) and from a state-dict file (the preset's config) each rank
    reads the tensors of its own part only; from adapters, its part of the base and its
    adapters, merged. The decoder's --emu-load is read whole, float32 on the CPU, and cut."""

    def __init__(self, config: InferenceConfig):
        self.inference = config
        found = partial_source(config.load, config.preset) if config.model is None and config.load else None
        self.adapters = found is not None and is_adapters(found[0])
        if found is not None and (self.adapters or not config.base):
            (self.source, self.config), self.whole = found, None
        else:  # the decoder's Emu, or a --pretrained-checkpoint given to what has no base: refused there
            self.source, self.whole = None, read_whole(config)
            self.config: ModelConfig = self.whole.config

    def part(self, keep, shard, device: torch.device, dtype: torch.dtype) -> Emu:
        """keep(emu) -> this rank's part of `emu`, on `device` in `dtype`; shard (or None): its
        tensor parallelism. Where the form allows, both are applied before the weights are
        read: each rank allocates its shards only, in the compute dtype (bf16: half the bytes)."""
        if self.adapters:
            return freeze(adapted_on_base(self.source, self.config, self.inference.base,
                                          self.inference.tokenizer_model, keep, shard, device).to(dtype))
        if self.whole is None:
            return read_part(self.source, self.config, keep, shard, device, dtype)
        part = keep(self.whole).to(device, dtype)
        if shard is not None:
            shard(part)
        return freeze(part)


def read_whole(config: InferenceConfig) -> Emu:
    """The whole frozen Emu, float32 on the CPU."""
    if config.model is not None:
        return load_emu(config.model, config.load)
    if not config.load:
        raise ValueError("no checkpoint to load: give --load / --checkpoint")
    return load_for_inference(config.load, config.preset, base=config.base, tokenizer_model=config.tokenizer_model)


def frozen_part(weights: Weights, layout: RunLayout) -> Emu:
    """This rank's part: its pipeline stage, on its device in the compute dtype, TP-sharded, frozen."""
    dims, pmesh = layout.dims, layout.pmesh
    stage = (lambda emu: prune_to_stage(emu, pmesh.pp_rank, dims.stage_layers)) if dims.pp > 1 else (lambda emu: emu)
    shard = (lambda part: shard_for_inference(part, pmesh.tp_mesh)) if dims.tp > 1 else None
    return weights.part(stage, shard, pmesh.device, layout.precision.dtype)
