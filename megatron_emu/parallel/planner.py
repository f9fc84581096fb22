"""Cluster planner: memory per rank and estimated throughput of each TP x PP x DP layout.

Memory per rank = weights + gradients + optimizer states (from parameter counts of the
rank's pipeline stage, / TP, / DP when FSDP shards them) + activations of the
micro-batches in flight + transient buffers. Activations are not guessed from a
formula: each block type (LLaMA layer, EVA block, Causal Former block, heads) runs once
at the planned per-rank shapes on fake tensors (no memory, no compute, any model
size), and the tensors autograd saves for backward are summed by storage. The code
that trains is the code that is measured, so a model change updates the plan
(planner_activations.py; this file: parameters, memory per rank, time, ranking).

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
from megatron_emu.model import flops as flops_model
from megatron_emu.parallel.mesh import ParallelDims
from megatron_emu.parallel.planner_activations import BlockActivations, activation_profile, block_bytes, cached

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


# -- parameters per pipeline rank --------------------------------------------------------
@cached
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of the encoder (ViT + ln_visual + Causal Former), the token embedding,
    one LLaMA layer, and the head (final norm, LM head, regression head)."""
    from megatron_emu.model.emu import build_emu

    emu = build_emu(config, device="meta")
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    return dict(encoder=count(emu.visual, emu.ln_visual, emu.causal_former), embed=count(emu.llm.tok_embeddings),
                layer=count(emu.llm.layers["0"]), head=count(emu.llm.norm, emu.llm.output, emu.regression_head),
                encoder_blocks=count(emu.visual.blocks, emu.causal_former.blocks),
                largest_block=max(count(emu.llm.layers["0"]), count(emu.visual.blocks[0]),
                                  count(emu.causal_former.blocks[0])),
                vision_block=count(emu.visual.blocks[0]), cf_block=count(emu.causal_former.blocks[0]),
                **tp_replicated_counts(emu))


def tp_replicated_counts(emu) -> dict[str, int]:
    """Parameters every TP rank holds whole, by tensor_parallel.py's plans: what no
    column/row-parallel plan covers (norms, the patch embedding, position embeddings,
    query tokens, the Causal Former projection) and row-parallel biases."""
    from megatron_emu.parallel import tensor_parallel as tpp

    def replicated(module, plan) -> int:
        n = 0
        for name, p in module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            style = plan.get(owner)
            if style is None or (isinstance(style, tpp.RowwiseParallel) and leaf == "bias"):
                n += p.numel()
        return n

    c = emu.causal_former
    outside = [p for m in (emu.visual, emu.ln_visual, c) for n, p in m.named_parameters()
               if not n.startswith("blocks.") and p is not c.relative_attention_bias.weight]
    return dict(layer_replicated=replicated(emu.llm.layers["0"], tpp.llama_layer_plan(False)),
                vision_block_replicated=replicated(emu.visual.blocks[0], tpp.vision_block_plan()),
                cf_block_replicated=replicated(c.blocks[0], tpp.causal_former_block_plan()),
                encoder_outside_replicated=sum(p.numel() for p in outside),
                head_replicated=sum(p.numel() for p in emu.llm.norm.parameters()))


def rank_parameters(model: ModelConfig, dims: ParallelDims, stages: list[int]) -> int:
    """Parameters one TP rank of these stages holds: sharded ones / TP, replicated whole
    (blocks whose heads TP does not divide stay whole, like parallelize_vision)."""
    counts, layers = parameter_counts(model), stage_layers(dims, model)
    tp, v, c = dims.tp, model.vision, model.causal_former
    shared = lambda total, whole: (total - whole) // tp + whole  # noqa: E731
    layer = shared(counts["layer"], counts["layer_replicated"])
    vis_block, cf_block = counts["vision_block"], counts["cf_block"]
    vision_split = v.heads % tp == 0 and v.mlp_dim % tp == 0
    cf_split = c.heads % tp == 0 and c.ffn_dim % tp == 0
    encoder = (v.layers * (shared(vis_block, counts["vision_block_replicated"]) if vision_split else vis_block)
               + c.layers * (shared(cf_block, counts["cf_block_replicated"]) if cf_split else cf_block))
    outside = counts["encoder"] - counts["encoder_blocks"]
    # Only the relative-position bias is split outside the blocks, and only with the heads.
    encoder += shared(outside, counts["encoder_outside_replicated"]) if cf_split else outside
    last = len(layers) - 1
    return sum(layers[s] * layer + (s == 0) * (encoder + counts["embed"] // tp)
               + (s == last) * shared(counts["head"], counts["head_replicated"]) for s in stages)


def rank_stages(dims: ParallelDims, pp_rank: int) -> list[int]:
    """Pipeline stages (indices) held by one PP rank: stage s lives on rank s % pp."""
    return [s for s in range(dims.num_stages) if s % dims.pp == pp_rank]


def stage_layers(dims: ParallelDims, model: ModelConfig) -> tuple[int, ...]:
    return dims.stage_layers if dims.pp > 1 else (model.llm.layers,)


# -- memory -----------------------------------------------------------------------------
def estimate_memory(model: ModelConfig, work: Workload, dims: ParallelDims, pp_rank: int = 0) -> MemoryEstimate:
    """Peak bytes of one rank of PP rank `pp_rank` (every TP/DP rank of it is alike)."""
    counts, layers = parameter_counts(model), stage_layers(dims, model)
    stages = rank_stages(dims, pp_rank)
    last = len(layers) - 1
    params = rank_parameters(model, dims, stages)
    fsdp = dims.sharding in ("fsdp", "hsdp")
    bf16_weights = fsdp and work.dtype != "float32"  # FSDP2 MixedPrecisionPolicy gathers bf16
    n_micro = work.global_batch_size // (work.micro_batch_size * dims.dp)
    shard = dims.dp_shard if fsdp else 1
    weights, optimizer = 4 * params // shard, 8 * params // shard
    # FSDP2 keeps unsharded gradients while sync is off (gradient accumulation).
    grads = 4 * params // (shard if n_micro == 1 else 1)

    prof = activation_profile(model, work.micro_batch_size, work.seq_length, dims.tp, work.dtype, bf16_weights)
    per_micro, workspace = 0, 0
    for s in stages:
        per_micro += stack_bytes(prof.llm_layer, layers[s], work)
        workspace = max(workspace, prof.llm_layer.saved if work.recompute else 0)
        if s == 0:
            images = work.micro_batch_size * work.images_per_sample
            per_micro += images * (stack_bytes(prof.vision_block, model.vision.layers, work)
                                   + stack_bytes(prof.causal_former_block, model.causal_former.layers, work)
                                   + prof.encoder_rest)
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
    rank_mb, tp_per_rank = [], []
    for r in range(dims.pp):
        stages = rank_stages(dims, r)
        flops = sum(stage_flops(model, work, layers[s], s == 0, s == len(layers) - 1) for s in stages) / dims.tp
        compute = flops / (hw.peak_tflops * 1e12 * hw.efficiency)
        tp_per_rank.append(sum(layers[s] for s in stages) * allreduce_seconds(tp_bytes, dims.tp, hw.intra_node_gbs))
        rank_mb.append(compute + tp_per_rank[-1])
    t_mb = max(rank_mb)
    bubble = (dims.pp - 1) / max(dims.virtual_stages, 1) if dims.pp > 1 else 0
    pipeline = (n_micro + bubble) * t_mb
    dp_exposed = data_parallel_exposed_seconds(model, work, dims, hw, layers, n_micro, t_mb, pipeline)
    tp_exposed = max(tp_per_rank) * (n_micro + bubble)  # TP collectives sit on the critical path
    step = pipeline + dp_exposed
    flops = flops_model.training_flops(model, work.global_batch_size, work.seq_length,
                                   work.global_batch_size * work.images_per_sample)
    exposed = tp_exposed + dp_exposed
    return dict(seconds=step, bubble_s=bubble * t_mb, dp_exposed_s=dp_exposed, tp_exposed_s=tp_exposed,
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
    params = (params + counts["encoder"] + counts["embed"] + counts["head"] / dims.pp) / dims.tp
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


# -- the search ---------------------------------------------------------------------------
@dataclass
class PlanRow:
    dims: ParallelDims
    recompute: str | None
    memory: MemoryEstimate
    time: dict
    fits: bool


def candidate_dims(model: ModelConfig, data: DataConfig, gpus: int, images_per_sample: float = 2.0,
                   shardings=("ddp", "fsdp")):
    """Every layout the trainer accepts (ParallelDims.validate) for `gpus` ranks; pipelines
    are split by cost (--pipeline-balance auto) at the workload's images per sample."""
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for tp in (d for d in divisors if d <= 8):
        for pp in (d for d in divisors if tp * d <= gpus and d <= model.llm.layers):
            for sharding in shardings:
                for schedule in ("1f1b", "interleaved") if pp > 1 else ("1f1b",):
                    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              sequence_parallel=False, pipeline_schedule=schedule,
                                              data_parallel_sharding=sharding, pipeline_balance="auto",
                                              pipeline_balance_images_per_sample=images_per_sample)
                    try:
                        dims = ParallelDims.from_config(parallel, gpus, model, data.seq_length)
                        dims.validate(model, data)
                    except ValueError:
                        continue
                    yield dims


def plan(model: ModelConfig, work: Workload, gpus: int, hw: Hardware, headroom: float = 0.9) -> list[PlanRow]:
    """Every valid layout x recompute choice, those that fit first, fastest first."""
    data = DataConfig(seq_length=work.seq_length, micro_batch_size=work.micro_batch_size,
                      global_batch_size=work.global_batch_size)
    rows = []
    for dims in candidate_dims(model, data, gpus, work.images_per_sample):
        for recompute in (None, "selective", "full"):
            w = dataclasses.replace(work, recompute=recompute, recompute_num_layers=None)
            memory = max((estimate_memory(model, w, dims, r) for r in range(dims.pp)), key=lambda m: m.total)
            rows.append(PlanRow(dims, recompute, memory, estimate_step_time(model, w, dims, hw),
                                memory.total <= headroom * hw.memory_gib * GiB))
    return sorted(rows, key=lambda row: (not row.fits, -row.time["tokens_per_s"]))
