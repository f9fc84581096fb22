"""Parity of every parallel layout with the single-process run (CPU, gloo, tiny, fp32).

Same seed, same weights, same micro-batches: the losses of each of 3 steps and the
(gathered) gradient of every parameter match the single-process reference within
rtol 1e-5. One spawn per world size runs all of its layouts (process groups and
imports are paid once), and the same spawn checks per-rank parameter bytes.

Every layout runs with the performance features multi-process training applies
(parallelize.py): fused norms and fused AdamW (the default --fused kernels) on
DTensors, and some layouts with activation recompute; the reference is the plain
unfused, non-recomputed model. The 2-rank spawn also checks the --bf16 contract
under FSDP2 (bf16 compute parameters, fp32 reduce-scatter, fp32 master weights) and
bf16 pipeline hand-offs, without bit parity.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_emu.config import DataConfig, OptimizerConfig, ParallelConfig, PerformanceConfig, TrainConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.parallel.mesh import ParallelDims, build_mesh
from megatron_emu.parallel.parallelize import parallelize_emu
from megatron_emu.training.build import build_run as build
from megatron_emu.training.optim import build_optimizer
from megatron_emu.training import build as build_module
from megatron_emu.training.step import train_step
from tests.batches import random_batch
from tests.dist_utils import spawn

STEPS, MICRO, SEQ, SEED = 3, 4, 80, 7  # 4 micro-batches of 1 sample per step (global batch 4)
RTOL = 1e-5


def run_config(performance: dict | None = None, **parallel) -> TrainConfig:
    return TrainConfig(
        performance=PerformanceConfig(**(performance or {})),
        preset="tiny",
        model=get_preset("tiny"),
        data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=MICRO),
        optimizer=OptimizerConfig(lr=1e-3, lr_decay_style="constant", weight_decay=0.01, clip_grad=1.0),
        parallel=ParallelConfig(**parallel),
        seed=SEED,
    )


def step_batches(config: TrainConfig) -> list[list[dict]]:
    """The micro-batches of each step; micro-batch m of step s is seeded by (s, m)."""
    return [[random_batch(config.model, 1, SEQ, 1, seed=100 * s + m) for m in range(MICRO)] for s in range(STEPS)]


def reference(config: TrainConfig) -> list[dict]:
    """Single process, written out plainly (not through the code under test)."""
    model = build_emu(config.model, seed=SEED)
    optimizer = build_optimizer(model, config.optimizer)
    special = config.model.special_tokens
    history = []
    for batches in step_batches(config):
        optimizer.zero_grad(set_to_none=True)
        lm = l2 = 0.0
        for b in batches:
            loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], special, config.l2_loss_weight)
            (loss.total / len(batches)).backward()
            lm, l2 = lm + loss.lm.item() / len(batches), l2 + loss.l2.item() / len(batches)
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), config.optimizer.clip_grad).item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        history.append(dict(lm=lm, l2=l2, norm=norm, grads=grads))
    return history


@pytest.fixture(scope="module")
def ref():
    return reference(run_config())


def full_grad(grad) -> torch.Tensor:
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def local_numel(param) -> int:
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


def build_run(world: int, parallel: dict, make_config=run_config):
    """(config, ParallelModel, optimizer, pmesh, micro-batches per DP rank) for one layout, built
    as pretraining builds it (training/build.py); parallel["performance"]: PerformanceConfig
    fields (default: fused kernels, fp32); parallel["vision_placement"]: a per-encoder placement
    (one --vision-tensor-parallel auto may choose) instead of the flag's."""
    parallel = dict(parallel)
    placement = parallel.pop("vision_placement", None)
    config = make_config(**parallel)
    chooser = build_module.vision_placement
    if placement is not None:
        build_module.vision_placement = lambda config, dims: placement
    try:
        run = build(config)
    finally:
        build_module.vision_placement = chooser
    assert run.dims.world_size == world
    return config, run.pmodel, run.optimizer, run.pmesh, run.n_micro


def check_layout(rank: int, world: int, name: str, parallel: dict, ref: list[dict]) -> None:
    config, pmodel, optimizer, pmesh, n_micro = build_run(world, parallel)
    assert bool(optimizer.defaults["fused"]) == config.performance.fused_kernels
    check_features_applied(name, pmodel, config.performance)
    seen = set()
    for step, batches in enumerate(step_batches(config)):
        mine = batches[pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]  # this DP rank's share
        result = train_step(pmodel, optimizer, mine, config)
        expect = ref[step]
        for key, got in (("lm", result.lm_loss), ("l2", result.l2_loss)):
            assert math.isclose(got, expect[key], rel_tol=RTOL), f"{name} step {step} {key}: {got} vs {expect[key]}"
        for pname, param in pmodel.named_parameters():
            got, want = full_grad(param.grad), expect["grads"][pname]
            torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item(),
                                       msg=lambda m: f"{name} step {step} grad {pname} (after clipping): {m}")
            seen.add(pname)
        norm = result.grad_norm
        assert math.isclose(norm, expect["norm"], rel_tol=RTOL), f"{name} step {step} grad norm: {norm} vs {expect['norm']}"
    check_coverage(name, seen, pmesh, ref)
    if config.performance.compile:  # dynamo really captured graphs (no silent eager fallback)
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0, f"{name}: no graph compiled"


def check_features_applied(name: str, pmodel, perf: PerformanceConfig) -> None:
    """Recompute wrapped this rank's LLaMA blocks (checkpointed forward) and the norms got
    the fused kernel: the parity above then covers them, not the plain model."""
    from megatron_emu.kernels import _torch_rms_norm_forward
    from megatron_emu.model.norms import RMSNorm

    layers = [layer for part in pmodel.parts for layer in part.llm.layers.values()]
    wrapped = [hasattr(layer.forward, "__wrapped__") for layer in layers]
    assert wrapped and all(wrapped) == (perf.recompute_granularity is not None), f"{name}: recompute {wrapped}"
    compiled = [getattr(layer, "_compiled_call_impl", None) is not None for layer in layers]
    assert all(compiled) == perf.compile and any(compiled) == perf.compile, f"{name}: compiled {compiled}"
    norms = [m for part in pmodel.parts for m in part.modules() if isinstance(m, RMSNorm)]
    fused = [getattr(m.forward, "__func__", None) is _torch_rms_norm_forward for m in norms]
    assert norms and all(fused) == perf.fused_kernels and any(fused) == perf.fused_kernels, f"{name}: fused {fused}"


def check_coverage(name: str, seen: set[str], pmesh, ref) -> None:
    """Across the pipeline ranks, every parameter was compared exactly once per stage."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(seen))
    union = set().union(*map(set, everyone))
    assert union == set(ref[0]["grads"]), f"{name}: parameters never compared: {set(ref[0]['grads']) - union}"


def check_bytes(rank: int, world: int, name: str, parallel: dict) -> None:
    """Per-rank parameter storage shrinks by TP on split layers, by stage under PP, by DP under FSDP."""
    config = run_config(**parallel)
    dims = ParallelDims.from_config(config.parallel, world, config.model, config.data.seq_length)
    n_micro = dims.validate(config.model, config.data)
    full = build_emu(config.model, seed=SEED)
    sizes = {n: p.numel() for n, p in full.named_parameters()}
    pmodel = parallelize_emu(full, build_mesh(dims, torch.device("cpu")), n_micro, None, SEED)
    local = {n: local_numel(p) for n, p in pmodel.named_parameters()}
    layers = {n.split(".")[2] for n in local if n.startswith("llm.layers.")}
    assert len(layers) == sum(dims.stage_layers[s] for s in range(dims.num_stages)) // dims.pp if dims.pp > 1 else \
        len(layers) == config.model.llm.layers
    shards = dims.tp * dims.dp_shard  # dp_shard: DP under fsdp, 1 under ddp
    for pname in ("llm.layers.{}.attention.wq.weight", "llm.layers.{}.feed_forward.w2.weight"):
        n = pname.format(min(layers, key=int))
        assert local[n] == sizes[n] // shards, f"{name}: {n} holds {local[n]} of {sizes[n]} values, expected 1/{shards}"
    # What this rank's stages hold before TP/DP: LLaMA split over TP and the FSDP shard
    # group (slack: the norms TP leaves replicated), the vision side and heads at least
    # over the shard group (TP may leave the patch embedding, norms, queries whole).
    total, stage_total, held = sum(sizes.values()), sum(sizes[n] for n in local), sum(local.values())
    llm = sum(sizes[n] for n in local if n.startswith("llm."))
    bound = llm / shards * 1.05 + llm / 20 + (stage_total - llm) / dims.dp_shard * 1.05
    assert held <= bound, f"{name}: rank {rank} holds {held} of {stage_total} parameter values (bound {bound:.0f})"
    if dims.pp > 1:  # only stage 0 holds the vision side, only the last stage the heads
        first, last = any(n.startswith("visual.") for n in local), "llm.output.weight" in local
        assert (first, last) == (pmesh_rank_is(rank, world, dims, 0), pmesh_rank_is(rank, world, dims, dims.pp - 1)), name
        assert stage_total < total, f"{name}: rank {rank}'s stages hold all {total} parameter values"


def check_bf16_fsdp(rank: int, world: int, ref: list[dict]) -> None:
    """--bf16 under FSDP2: blocks compute on bf16 gathered parameters, gradients are
    reduce-scattered in fp32, sharded parameters (master weights), their gradients and
    the Adam moments stay fp32. The loss is checked loosely (bf16 is not bit-equal)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class RecordingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            self.dtypes.add(input_tensor.dtype)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    config, pmodel, optimizer, pmesh, n_micro = build_run(world, dict(data_parallel_sharding="fsdp",
                                                                      performance=dict(bf16=True)))
    recorder = RecordingReduceScatter()
    recorder.dtypes = set()
    for module in pmodel.parts[0].modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(recorder)
    seen = []
    w1 = pmodel.parts[0].llm.layers["0"].feed_forward.w1
    w1.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, i[0].dtype, o.dtype)))
    mine = step_batches(config)[0][pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]
    result = train_step(pmodel, optimizer, mine, config)
    assert seen and all(s == (torch.bfloat16,) * 3 for s in seen), f"bf16 FSDP2: w1 (weight, input, output) dtypes {seen}"
    assert recorder.dtypes == {torch.float32}, f"bf16 FSDP2: reduce-scatter dtypes {recorder.dtypes}"
    for pname, param in pmodel.named_parameters():
        assert isinstance(param, DTensor) and param.dtype == torch.float32, f"{pname}: {type(param)} {param.dtype}"
        assert param.grad.dtype == torch.float32, f"{pname}: grad {param.grad.dtype}"
        assert all(v.dtype == torch.float32 for k, v in optimizer.state[param].items() if k != "step"), pname
    assert math.isclose(result.lm_loss, ref[0]["lm"], rel_tol=2e-2), f"bf16 FSDP2 lm loss {result.lm_loss} vs {ref[0]['lm']}"


def check_bf16_pipeline(rank: int, world: int, ref: list[dict]) -> None:
    """--bf16 with PP2: stages hand each other the hidden states and the l2 targets in
    bf16 (the static stage metadata matches what is sent); the loss is checked loosely."""
    config, pmodel, optimizer, pmesh, n_micro = build_run(world, dict(pipeline_model_parallel_size=2,
                                                                      performance=dict(bf16=True)))
    sent, received = [], []
    (stage,) = pmodel.parts
    if stage.is_first:
        stage.register_forward_hook(lambda m, i, o: sent.append((o[0].dtype, o[2].dtype)))
    else:
        stage.register_forward_pre_hook(lambda m, i: received.append((i[0].dtype, i[2].dtype)))
    result = train_step(pmodel, optimizer, step_batches(config)[0], config)
    assert all(s == (torch.bfloat16,) * 2 for s in sent + received) and len(sent + received) == MICRO, (sent, received)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in pmodel.named_parameters())
    assert math.isclose(result.lm_loss, ref[0]["lm"], rel_tol=2e-2), f"bf16 PP2 lm loss {result.lm_loss} vs {ref[0]['lm']}"
    assert math.isclose(result.l2_loss, ref[0]["l2"], rel_tol=5e-2), f"bf16 PP2 l2 loss {result.l2_loss} vs {ref[0]['l2']}"


def check_validation(rank: int, world: int, ref: list[dict]) -> None:
    """Forward-only validation through each layout (the pipeline's `eval` schedule, vocab-
    parallel loss under TP, FSDP2) equals the single-process loss at the same weights: the
    reference's first step, taken before any update."""
    from megatron_emu.training.step import validation_loss

    for parallel in VALIDATION_LAYOUTS:
        config, pmodel, _, pmesh, n_micro = build_run(world, parallel)
        batches = step_batches(config)[0]
        mine = batches[pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]
        lm, l2 = validation_loss(pmodel, [mine], config)
        assert math.isclose(lm, ref[0]["lm"], rel_tol=RTOL), f"validation {parallel}: lm {lm} vs {ref[0]['lm']}"
        assert math.isclose(l2, ref[0]["l2"], rel_tol=RTOL), f"validation {parallel}: l2 {l2} vs {ref[0]['l2']}"
        assert all(p.grad is None for _, p in pmodel.named_parameters()), f"validation {parallel} made gradients"


VALIDATION_LAYOUTS = [
    dict(pipeline_model_parallel_size=2),
    dict(tensor_model_parallel_size=2, sequence_parallel=True),
    dict(data_parallel_sharding="fsdp"),
]


def check_meta_init(rank: int, world: int, ref: list[dict], parallel: dict | None = None) -> None:
    """Built on the meta device and sharded before allocation (the training path), each
    rank initialises only its shards, to exactly the single-process build_emu(seed) values."""
    parallel = parallel or META_INIT_LAYOUTS[world]
    config = run_config(**parallel)
    dims = ParallelDims.from_config(config.parallel, world, config.model, config.data.seq_length)
    n_micro = dims.validate(config.model, config.data)
    from megatron_emu.training.metrics import CPUPeakMemory

    with CPUPeakMemory() as tracker:
        pmodel = parallelize_emu(build_emu(config.model, device="meta"), build_mesh(dims, torch.device("cpu")),
                                 n_micro, None, SEED)
    want = dict(build_emu(config.model, seed=SEED).named_parameters())
    # Never the whole stage unsharded: this rank's shards plus about a whole parameter or
    # two (tiny's are large relative to it: 0.6 of 5.4 MB). Measured 0.60-0.70 x the stage.
    stage = sum(want[n].numel() * want[n].element_size() for n, _ in pmodel.named_parameters())
    assert tracker.peak < 0.8 * stage, f"meta init {parallel}: peak {tracker.peak} B, the unsharded stage is {stage} B"
    for pname, param in pmodel.named_parameters():
        assert not param.is_meta, pname
        torch.testing.assert_close(full_grad(param.detach()), want[pname].detach(), rtol=0, atol=0,
                                   msg=lambda m: f"meta init {parallel} {pname}: {m}")


# Sharded meta-device initialisation; the 8-rank layout has FSDP2 over TP-sharded dims (strided).
META_INIT_LAYOUTS = {
    2: dict(tensor_model_parallel_size=2, sequence_parallel=True),
    4: dict(data_parallel_sharding="hsdp", num_distributed_optimizer_instances=2),
    8: dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_sharding="fsdp"),
}


def pmesh_rank_is(rank: int, world: int, dims: ParallelDims, pp_rank: int) -> bool:
    """Rank order is (pp, dp, tp), TP fastest: PP rank = rank // (DP x TP)."""
    return rank // (dims.dp * dims.tp) == pp_rank


WORLD2 = {
    "TP2": dict(tensor_model_parallel_size=2),
    "TP2+SP": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "PP2 1F1B": dict(pipeline_model_parallel_size=2),
    # tiny at 80 tokens, 2 images per sample: ViT + Causal Former cost ~2.6 LLaMA layers -> split [1, 3].
    "PP2 1F1B auto-balanced": dict(pipeline_model_parallel_size=2, pipeline_balance="auto"),
    "PP2 interleaved": dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1),
    "PP2 zero-bubble": dict(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble"),
    "DP2 DDP": dict(data_parallel_sharding="ddp"),
    "DP2 FSDP2": dict(data_parallel_sharding="fsdp"),
    # --no-overlap-grad-reduce: one FSDP2 unit for the whole model, reduced after backward.
    "DP2 FSDP2 no overlap": dict(data_parallel_sharding="fsdp", overlap_grad_reduce=False),
    # Activation recompute in multi-process training (the plain layouts above also run
    # with fused norms and fused AdamW on DTensors; one layout without them).
    "TP2 full recompute": dict(tensor_model_parallel_size=2, performance=dict(recompute_granularity="full")),
    "PP2 1F1B selective recompute": dict(pipeline_model_parallel_size=2,
                                         performance=dict(recompute_granularity="selective")),
    "DP2 FSDP2 selective recompute": dict(data_parallel_sharding="fsdp",
                                          performance=dict(recompute_granularity="selective")),
    "PP2 interleaved selective recompute": dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved",
                                                num_layers_per_virtual_pipeline_stage=1,
                                                performance=dict(recompute_granularity="selective")),
    "PP2 zero-bubble full recompute": dict(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble",
                                           performance=dict(recompute_granularity="full")),
    "TP2+SP unfused": dict(tensor_model_parallel_size=2, sequence_parallel=True, performance=dict(fused_kernels=False)),
    # Image encoders replicated, each TP rank encoding its share of the images (1 per micro-batch:
    # rank 1 encodes a padding copy whose output is dropped).
    "TP2 images split": dict(tensor_model_parallel_size=2, vision_tensor_parallel="images"),
    "TP2+SP ViT heads, Causal Former images": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                                   vision_placement=dict(visual="heads", causal_former="images")),
    "TP2 ViT images, Causal Former heads": dict(tensor_model_parallel_size=2,
                                                vision_placement=dict(visual="images", causal_former="heads")),
}
BYTES2 = {k: WORLD2[k] for k in ("TP2", "PP2 1F1B", "DP2 FSDP2", "DP2 DDP")}
# TP x PP (the layout whose stage hand-offs and TP collectives interact), sequence
# parallel under FSDP2, and hybrid sharding (2 replicas x 2 shards).
WORLD4 = {
    "TP2xPP2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    # 4 micro-batches per rank: enough for 4 virtual stages (not at DP2 on 8 ranks).
    "TP2+SP xPP2 interleaved": dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2,
                                    pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1),
    "TP2+SP xDP2 FSDP2": dict(tensor_model_parallel_size=2, sequence_parallel=True, data_parallel_sharding="fsdp"),
    "DP4 HSDP 2x2": dict(data_parallel_sharding="hsdp", num_distributed_optimizer_instances=2),
    # Each stage reduce-scatters during its last backward (pipeline.OverlappedStage).
    "PP2 1F1B xDP2 FSDP2": dict(pipeline_model_parallel_size=2, data_parallel_sharding="fsdp"),
    "TP2 images split xDP2 FSDP2": dict(tensor_model_parallel_size=2, vision_tensor_parallel="images",
                                        data_parallel_sharding="fsdp"),
}
BYTES4 = {k: WORLD4[k] for k in ("TP2xPP2", "DP4 HSDP 2x2")}
WORLD8 = {
    "TP2xPP2xDP2 FSDP2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 data_parallel_sharding="fsdp"),
    "TP2+SP xPP2 xDP2 FSDP2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                   pipeline_model_parallel_size=2, data_parallel_sharding="fsdp"),
    "TP2+SP xDP4 HSDP 2x2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                  data_parallel_sharding="hsdp", num_distributed_optimizer_instances=2),
}
BYTES8 = {k: WORLD8[k] for k in ("TP2xPP2xDP2 FSDP2",)}


# torch.compile under TP+SP, PP and FSDP2 (with recompute). aot_eager traces the same
# dynamo/AOTAutograd graphs as inductor without generating kernels (minutes of codegen on
# 2 CPU cores); tests/test_precision.py and README cover inductor itself.
COMPILED = dict(compile=True, compile_backend="aot_eager")
WORLD2_COMPILED = {
    "TP2+SP compiled": dict(tensor_model_parallel_size=2, sequence_parallel=True, performance=COMPILED),
    "PP2 1F1B compiled + selective recompute": dict(
        pipeline_model_parallel_size=2, performance=dict(COMPILED, recompute_granularity="selective")),
    "DP2 FSDP2 compiled + full recompute": dict(
        data_parallel_sharding="fsdp", performance=dict(COMPILED, recompute_granularity="full")),
}


def world_worker(rank: int, world: int, layouts: dict, bytes_layouts: dict, ref: list[dict], extra=()) -> None:
    for name, parallel in layouts.items():
        check_layout(rank, world, name, parallel, ref)
    for name, parallel in bytes_layouts.items():
        check_bytes(rank, world, name, parallel)
    for check in extra:
        check(rank, world, ref)


def test_two_ranks(ref):
    spawn(2, world_worker, WORLD2, BYTES2, ref, (check_bf16_fsdp, check_bf16_pipeline, check_meta_init, check_validation))


def test_two_ranks_compiled(ref):
    spawn(2, world_worker, WORLD2_COMPILED, {}, ref)


def test_four_ranks(ref):
    spawn(4, world_worker, WORLD4, BYTES4, ref, (check_meta_init,))


def test_eight_ranks(ref):
    spawn(8, world_worker, WORLD8, BYTES8, ref, (check_meta_init,))
