"""Cluster planner: memory per rank and estimated throughput of each TP x PP x DP layout.

Memory per rank = weights + gradients + optimizer states (from parameter counts of the
rank's pipeline stage, / TP except what TP replicates, such as image encoders placed on
images, / DP when FSDP shards them) + activations of the micro-batches in flight +
transient buffers. Activations are not guessed from a
formula: each block type (LLaMA layer, EVA block, Causal Former block, heads) runs once
at the planned per-rank shapes on fake tensors (no memory, no compute, any model
size), and the tensors autograd saves for backward are summed by storage. The code
that trains is the code that is measured, so a model change updates the plan
(planner_activations.py; parameters: planner_parameters.py; this file: memory per rank,
time, ranking).

Precision: fp32 keeps 4-byte everything. bf16 keeps fp32 master weights, fp32
gradients and Adam states (16 bytes / parameter); with FSDP the blocks compute on
bf16 gathered parameters (MixedPrecisionPolicy), otherwise autocast keeps a bf16
copy of every weight per micro-batch for backward (counted by the fake run).

Throughput: the busiest pipeline stage's FLOPs (model/flops.py) at an assumed
efficiency of the device peak, plus the 1F1B bubble, tensor-parallel all-reduces on
the intra-node links and data-parallel traffic on the inter-node links (the part that
does not overlap backward). The ranking is a model; measured figures come from
tools/benchmark_throughput.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_emu.config import DataConfig, ModelConfig, ParallelConfig
from megatron_emu.parallel import block_costs
from megatron_emu.parallel.mesh import ParallelDims
from megatron_emu.parallel.planner_activations import BlockActivations, activation_profile, block_bytes
from megatron_emu.parallel.planner_parameters import (  # noqa: F401 (parameter_counts: the planner's API)
    encoder_placement, parameter_counts, rank_parameters, stage_layers)
from megatron_emu.parallel.planner_time import (  # noqa: F401 (allreduce_seconds, stage_flops: the planner's API)
    allreduce_seconds, estimate_step_time, rank_stages, stage_flops, workload_placement)

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16
    intra_node_gbs: float  # per GPU, GB/s (NVLink)
    inter_node_gbs: float  # per GPU, GB/s (InfiniBand)
    gpus_per_node: int = 8
    efficiency: float = 0.5  # fraction of peak reached by large matmul-bound blocks


HARDWARE = {
    "a100-80g": Hardware("A100-SXM4-80GB", 80, 312, 240, 25),
    "h100-80g": Hardware("H100-SXM5-80GB", 80, 989, 360, 50),
    "h200": Hardware("H200-SXM-141GB", 141, 989, 360, 50),
}


@dataclass(frozen=True)
class Workload:
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    images_per_sample: int = 1
    dtype: str = "bfloat16"  # float32 | bfloat16
    recompute: str | None = None  # None | selective | full
    recompute_num_layers: int | None = None
    vision_tensor_parallel: str = "heads"  # heads | images | auto (--vision-tensor-parallel)


@dataclass
class MemoryEstimate:
    """Bytes on the busiest rank."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    in_flight: int  # micro-batches whose activations are held at once
    grads_with_activations: bool  # False: one micro-batch, gradients appear as activations go

    @property
    def total(self) -> int:
        peak_work = self.activations + self.transient
        if self.grads_with_activations:
            peak_work += self.grads
        return self.weights + self.optimizer + max(peak_work, self.grads)

    def row(self) -> dict:
        gib = lambda b: round(b / GiB, 2)  # noqa: E731
        return dict(weights=gib(self.weights), grads=gib(self.grads), optimizer=gib(self.optimizer),
                    activations=gib(self.activations), transient=gib(self.transient), total=gib(self.total),
                    in_flight=self.in_flight)


# -- memory -----------------------------------------------------------------------------
def estimate_memory(model: ModelConfig, work: Workload, dims: ParallelDims, pp_rank: int = 0) -> MemoryEstimate:
    """Peak bytes of one rank of PP rank `pp_rank` (every TP/DP rank of it is alike)."""
    counts, layers = parameter_counts(model), stage_layers(dims, model)
    stages = rank_stages(dims, pp_rank)
    last = len(layers) - 1
    placement = workload_placement(model, work, dims)
    params = rank_parameters(model, dims, stages, placement)
    fsdp = dims.sharding in ("fsdp", "hsdp")
    bf16_weights = fsdp and work.dtype != "float32"  # FSDP2 MixedPrecisionPolicy gathers bf16
    n_micro = work.global_batch_size // (work.micro_batch_size * dims.dp)
    shard = dims.dp_shard if fsdp else 1
    weights, optimizer = 4 * params // shard, 8 * params // shard
    # FSDP2 keeps unsharded gradients while sync is off (gradient accumulation).
    grads = 4 * params // (shard if n_micro == 1 else 1)

    # An encoder placed on heads runs 1/TP-wide blocks on every image; one on images
    # full-width blocks on this rank's ceil(N / TP) images; a replicated one both in full.
    encoder_tp = tuple(dims.tp if placement[e] == "heads" else 1 for e in ("visual", "causal_former"))
    prof = activation_profile(model, work.micro_batch_size, work.seq_length, dims.tp, work.dtype, bf16_weights,
                              encoder_tp)
    per_micro, workspace = 0, 0
    for s in stages:
        per_micro += stack_bytes(prof.llm_layer, layers[s], work)
        workspace = max(workspace, prof.llm_layer.saved if work.recompute else 0)
        if s == 0:
            images = work.micro_batch_size * work.images_per_sample
            share = lambda e: -(-images // dims.tp) if placement[e] == "images" else images  # noqa: E731
            per_micro += (share("visual") * (stack_bytes(prof.vision_block, model.vision.layers, work)
                                             + prof.encoder_rest)
                          + share("causal_former") * stack_bytes(prof.causal_former_block,
                                                                 model.causal_former.layers, work))
        if s == last:
            per_micro += prof.llm_head
    in_flight = in_flight_microbatches(dims, pp_rank, n_micro)
    compute_bytes = 2 if work.dtype != "float32" else 4
    transient = workspace
    if last in stages:  # backward starts with fp32 gradients of the logits (two alive at once)
        transient += 2 * 4 * work.micro_batch_size * work.seq_length * model.llm.vocab_size // dims.tp
    if dims.dp > 1:
        # FSDP2 (behind ddp too) computes on gathered copies: the part's own (non-block)
        # parameters for the whole step, two blocks at a time (or, under PP with FSDP, the
        # whole stage), plus one block's gradient reduce buffer.
        block = counts["largest_block"] // dims.tp
        own = ((0 in stages) * (counts["embed"] + counts["encoder"] - counts["encoder_blocks"])
               + (last in stages) * counts["head"]) // dims.tp
        gathered = params if fsdp and dims.pp > 1 else own + 2 * block
        transient += gathered * (compute_bytes if bf16_weights else 4) + 4 * block
    return MemoryEstimate(weights, grads, optimizer, in_flight * per_micro, transient, in_flight,
                          grads_with_activations=n_micro > 1 or dims.pp > 1)


def stack_bytes(block: BlockActivations, layers: int, work: Workload) -> int:
    recomputed = layers if work.recompute != "full" or work.recompute_num_layers is None else min(
        layers, work.recompute_num_layers)
    return recomputed * block_bytes(block, work.recompute, True) + (layers - recomputed) * block.saved


def in_flight_microbatches(dims: ParallelDims, pp_rank: int, n_micro: int) -> int:
    """Micro-batches whose activations a PP rank holds at its peak: 1F1B warms up with
    pp - rank forwards; interleaving adds (pp - 1) / (pp * v) more (Megatron-LM paper)."""
    if dims.pp == 1:
        return 1
    held = min(dims.pp - pp_rank, n_micro)
    if dims.virtual_stages > 1:
        held = -(-held * (dims.pp * dims.virtual_stages + dims.pp - 1) // (dims.pp * dims.virtual_stages))
    return held


# -- the search ---------------------------------------------------------------------------
@dataclass
class PlanRow:
    dims: ParallelDims
    recompute: str | None
    memory: MemoryEstimate
    time: dict
    fits: bool


def candidate_dims(model: ModelConfig, data: DataConfig, gpus: int, images_per_sample: float = 2.0,
                   shardings=("ddp", "fsdp"), costs_file: str = ""):
    """Every layout the trainer accepts (ParallelDims.validate) for `gpus` ranks; pipelines
    are split by cost (--pipeline-balance auto) at the workload's images per sample, by
    measured block times when `costs_file` (--pipeline-balance-costs) is given."""
    if costs_file:  # a bad file is the user's error, not a layout to skip
        block_costs.load_costs(costs_file, model, data.seq_length)
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for tp in (d for d in divisors if d <= 8):
        for pp in (d for d in divisors if tp * d <= gpus and d <= model.llm.layers):
            for sharding in shardings:
                for schedule in ("1f1b", "interleaved") if pp > 1 else ("1f1b",):
                    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              sequence_parallel=False, pipeline_schedule=schedule,
                                              data_parallel_sharding=sharding, pipeline_balance="auto",
                                              pipeline_balance_images_per_sample=images_per_sample,
                                              pipeline_balance_costs=costs_file)
                    try:
                        dims = ParallelDims.from_config(parallel, gpus, model, data.seq_length)
                        dims.validate(model, data)
                    except ValueError:
                        continue
                    yield dims


def plan(model: ModelConfig, work: Workload, gpus: int, hw: Hardware, headroom: float = 0.9,
         costs_file: str = "") -> list[PlanRow]:
    """Every valid layout x recompute choice, those that fit first, fastest first. `costs_file`:
    measured block times for the pipeline split (the step time stays the FLOPs model's)."""
    data = DataConfig(seq_length=work.seq_length, micro_batch_size=work.micro_batch_size,
                      global_batch_size=work.global_batch_size)
    rows = []
    for dims in candidate_dims(model, data, gpus, work.images_per_sample, costs_file=costs_file):
        for recompute in (None, "selective", "full"):
            w = dataclasses.replace(work, recompute=recompute, recompute_num_layers=None)
            memory = max((estimate_memory(model, w, dims, r) for r in range(dims.pp)), key=lambda m: m.total)
            rows.append(PlanRow(dims, recompute, memory, estimate_step_time(model, w, dims, hw),
                                memory.total <= headroom * hw.memory_gib * GiB))
    return sorted(rows, key=lambda row: (not row.fits, -row.time["tokens_per_s"]))
