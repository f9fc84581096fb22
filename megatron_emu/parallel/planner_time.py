"""Planner, time side: seconds per optimizer step of a layout on the slowest pipeline rank,
and the parts of it that wait on communication (TP collectives, the data-parallel traffic
the schedule does not hide, image-split encoders' gradient all-reduce). planner.py
searches layouts with it; its assumptions are printed by tools/plan.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_emu.config import ModelConfig
from megatron_emu.model import flops as flops_model
from megatron_emu.parallel.mesh import ParallelDims
from megatron_emu.parallel.planner_encoders import encoder_parameters_per_rank, encoder_rank_flops, encoder_tp_bytes
from megatron_emu.parallel.planner_parameters import encoder_placement, parameter_counts, stage_layers

if TYPE_CHECKING:
    from megatron_emu.parallel.planner import Hardware, Workload


# -- pipeline ranks ---------------------------------------------------------------------
def rank_stages(dims: ParallelDims, pp_rank: int) -> list[int]:
    """Pipeline stages (indices) held by one PP rank: stage s lives on rank s % pp."""
    return [s for s in range(dims.num_stages) if s % dims.pp == pp_rank]



def workload_placement(model: ModelConfig, work: Workload, dims: ParallelDims) -> dict[str, str]:
    """--vision-tensor-parallel resolved as training/build.py resolves it."""
    images_per_step = work.global_batch_size / dims.dp * work.images_per_sample
    return encoder_placement(model, dims, work.vision_tensor_parallel, images_per_step)



# -- throughput model -------------------------------------------------------------------
def stage_flops(model: ModelConfig, work: Workload, layers: int, first: bool, last: bool) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro-batch through one stage."""
    return flops_model.stage_flops(model, work.micro_batch_size, work.seq_length, work.images_per_sample, layers,
                               first, last, work.recompute, work.recompute_num_layers)


def allreduce_seconds(nbytes: float, ranks: int, gbs: float) -> float:
    return 2 * (ranks - 1) / ranks * nbytes / (gbs * 1e9) if ranks > 1 else 0.0


def estimate_step_time(model: ModelConfig, work: Workload, dims: ParallelDims, hw: Hardware) -> dict:
    """Seconds per optimizer step on the slowest PP rank, and its parts."""
    layers = stage_layers(dims, model)
    n_micro = work.global_batch_size // (work.micro_batch_size * dims.dp)
    act_bytes = 2 if work.dtype != "float32" else 4
    # TP: two all-reduces of (B, S, H) per LLaMA layer forward, two backward (+2 when recomputed).
    per_layer = 4 + (2 if work.recompute == "full" else 0)
    tp_bytes = per_layer * work.micro_batch_size * work.seq_length * model.llm.hidden * act_bytes
    placement = workload_placement(model, work, dims)
    images = work.micro_batch_size * work.images_per_sample
    encoder_bytes = encoder_tp_bytes(model, images, act_bytes, placement)
    rank_mb, tp_per_rank = [], []
    for r in range(dims.pp):
        stages = rank_stages(dims, r)
        flops = sum(stage_flops(model, work, layers[s], s == 0, s == len(layers) - 1) for s in stages)
        tp_s = sum(layers[s] for s in stages) * allreduce_seconds(tp_bytes, dims.tp, hw.intra_node_gbs)
        if 0 in stages:  # the encoders, divided over TP as their placement divides them
            encoders = stage_flops(model, work, 0, True, False)
            flops = (flops - encoders) / dims.tp + encoder_rank_flops(model, encoders, images, dims.tp, placement)
            tp_s += (allreduce_seconds(encoder_bytes["allreduce"], dims.tp, hw.intra_node_gbs)
                     + allreduce_seconds(encoder_bytes["gather"], dims.tp, hw.intra_node_gbs) / 2)
        else:
            flops /= dims.tp
        tp_per_rank.append(tp_s)
        rank_mb.append(flops / (hw.peak_tflops * 1e12 * hw.efficiency) + tp_s)
    t_mb = max(rank_mb)
    bubble = (dims.pp - 1) / max(dims.virtual_stages, 1) if dims.pp > 1 else 0
    pipeline = (n_micro + bubble) * t_mb
    dp_exposed = data_parallel_exposed_seconds(model, work, dims, hw, layers, n_micro, t_mb, pipeline)
    # Image-split encoders: their gradients summed over TP after backward, once a step (the
    # local FSDP shards under fsdp): on the critical path, like the TP collectives.
    encoder_grads = allreduce_seconds(encoder_bytes["step_allreduce"] / dims.dp_shard, dims.tp, hw.intra_node_gbs)
    tp_exposed = max(tp_per_rank) * (n_micro + bubble) + encoder_grads  # TP collectives sit on the critical path
    step = pipeline + dp_exposed + encoder_grads
    flops = flops_model.training_flops(model, work.global_batch_size, work.seq_length,
                                   work.global_batch_size * work.images_per_sample)
    exposed = tp_exposed + dp_exposed
    return dict(seconds=step, bubble_s=bubble * t_mb, dp_exposed_s=dp_exposed, tp_exposed_s=tp_exposed,
                encoder_grads_s=encoder_grads,
                exposed_comm_fraction=exposed / step, tokens_per_s=work.global_batch_size * work.seq_length / step,
                mfu=flops / step / (dims.world_size * hw.peak_tflops * 1e12))


def data_parallel_exposed_seconds(model: ModelConfig, work: Workload, dims: ParallelDims, hw: Hardware,
                                  layers: tuple[int, ...], n_micro: int, t_mb: float, pipeline: float) -> float:
    """Data-parallel traffic the schedule does not hide, as the code runs it today.

    - Parameter all-gathers (fsdp): FSDP2 prefetches the next block's gather behind the
      current block's compute, so they hide behind the pipeline's compute. Without PP a
      block is gathered in forward and again in backward of every micro-batch; with PP
      the stage stays gathered for the whole step (data_parallel.py), once.
    - Gradient reduction (fp32 reduce-scatter, or all-reduce of full replicas): gradients
      accumulate over micro-batches and are reduced once: FSDP2 reduces each block as its
      gradient becomes final in the last micro-batch, which hides behind at most that
      micro-batch's backward (~2/3 of it); with PP, per stage (pipeline.OverlappedStage).
      Zero-bubble splits the backward and keeps torch's reduction after the schedule:
      nothing hides it.
    """
    counts = parameter_counts(model)
    params = max(sum(layers[s] * counts["layer"] for s in rank_stages(dims, r)) for r in range(dims.pp))
    encoder = encoder_parameters_per_rank(model, dims.tp, workload_placement(model, work, dims))
    params = (params + counts["embed"] + counts["head"] / dims.pp) / dims.tp + encoder
    bw = hw.intra_node_gbs if dims.tp * dims.dp <= hw.gpus_per_node else hw.inter_node_gbs
    act_bytes = 2 if work.dtype != "float32" else 4
    if dims.dp_shard > 1:  # all-gather / reduce-scatter each move half of an all-reduce
        gathers = (2 * n_micro if dims.pp == 1 else 1) * act_bytes * params
        gather_s = allreduce_seconds(gathers, dims.dp_shard, bw) / 2
        reduce_s = allreduce_seconds(4 * params, dims.dp_shard, bw) / 2
    else:
        gather_s, reduce_s = 0.0, 0.0
    if dims.dp_replicate > 1:  # full replicas (ddp, hsdp across groups): all-reduce of fp32 gradients
        reduce_s += allreduce_seconds(4 * params / dims.dp_shard, dims.dp_replicate, bw)
    reduce_hidden_by = t_mb * 2 / 3 if dims.pp == 1 or dims.schedule != "zero-bubble" else 0.0
    return max(0.0, gather_s - pipeline) + max(0.0, reduce_s - reduce_hidden_by)
