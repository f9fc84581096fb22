"""Planner: predicted peak memory vs measured (tiny, CPU), and the emu-14b plan."""

import importlib.util
from pathlib import Path

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.config import ParallelConfig, get_preset
from megatron_emu.data.random_batches import random_batch
from megatron_emu.model.emu import build_emu
from megatron_emu.parallel.mesh import ParallelDims
from megatron_emu.training import train
from megatron_emu.training.build import build_run
from megatron_emu.training.metrics import CPUPeakMemory
from megatron_emu.parallel.planner import (HARDWARE, Workload, allreduce_seconds, estimate_memory,
                                           estimate_step_time, parameter_counts, plan, rank_stages)

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured_peak(config, images_per_sample: int) -> int:
    """Peak live tensor bytes over one steady-state training step (the second)."""
    d = config.data
    run = build_run(config)  # as pretraining builds it (training/build.py)
    pmodel, optimizer, precision = run.pmodel, run.optimizer, run.precision
    micro = [random_batch(config.model, d.micro_batch_size, d.seq_length, images_per_sample, seed=i)
             for i in range(run.n_micro)]
    try:
        train.train_step(pmodel, optimizer, micro, config, precision)  # creates the Adam states
        tracker = CPUPeakMemory()
        with tracker:
            params = list(pmodel.parts[0].parameters())
            tracker.track(params, [p.grad for p in params if p.grad is not None], optimizer.state_dict()["state"], micro)
            train.train_step(pmodel, optimizer, micro, config, precision)
    finally:
        run.close()
    return tracker.peak


@pytest.mark.parametrize("flags", [
    [],
    ["--recompute-granularity", "full"],
    ["--bf16", "--recompute-activations", "--global-batch-size", "8"],
], ids=["fp32", "full-recompute", "bf16-selective-2-microbatches"])
def test_predicted_peak_memory_within_10_percent(flags):
    config = parse_args(["--preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "4",
                         "--seq-length", "128", *flags])
    d, perf = config.data, config.performance
    work = Workload(d.micro_batch_size, d.global_batch_size, d.seq_length, 1, perf.compute_dtype,
                    perf.recompute_granularity, perf.recompute_num_layers)
    dims = ParallelDims.from_config(config.parallel, 1, config.model)
    predicted = estimate_memory(config.model, work, dims).total
    measured = measured_peak(config, images_per_sample=1)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_parameter_counts_cover_the_model():
    config = get_preset("tiny")
    counts = parameter_counts(config)
    total = sum(p.numel() for p in build_emu(config, device="meta").parameters())
    assert counts["encoder"] + counts["embed"] + config.llm.layers * counts["layer"] + counts["head"] == total


def test_recompute_and_sharding_reduce_memory():
    config = get_preset("emu-14b")
    dims = {s: ParallelDims.from_config(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                                       data_parallel_sharding=s), 128, config)
            for s in ("ddp", "fsdp")}
    base = Workload(1, 352, 1024, 2)
    mem = {r: estimate_memory(config, Workload(1, 352, 1024, 2, recompute=r), dims["fsdp"]) for r in (None, "selective", "full")}
    assert mem["full"].activations < mem["selective"].activations < mem[None].activations
    assert estimate_memory(config, base, dims["fsdp"]).optimizer * 32 == estimate_memory(config, base, dims["ddp"]).optimizer


def test_emu_14b_on_128_a100_recommends_a_fitting_layout(capsys):
    rows = load_tool("plan").main(["--preset", "emu-14b", "--gpus", "128", "--gpu", "a100-80g", "--top", "5"])
    best = rows[0]
    assert best.fits and best.memory.total < 0.9 * 80 * 2**30
    assert best.dims.world_size == 128 and 352 % best.dims.dp == 0
    assert any(not row.fits for row in rows)  # some layouts (e.g. TP1 PP4 DDP) do not fit
    assert "recommended: " in capsys.readouterr().out


def test_no_valid_layout_raises():
    with pytest.raises(ValueError, match="no TP x PP x DP layout"):
        load_tool("plan").main(["--preset", "tiny", "--gpus", "7", "--global-batch-size", "4", "--micro-batch-size", "4"])


def test_plan_orders_fitting_rows_by_throughput():
    rows = plan(get_preset("1b"), Workload(4, 64, 1024, 1), 8, HARDWARE["h100-80g"])
    fitting = [r.time["tokens_per_s"] for r in rows if r.fits]
    assert fitting == sorted(fitting, reverse=True) and fitting



def test_step_time_exposes_what_the_schedule_cannot_hide():
    """Gradients are reduced once per step, during the last micro-batch's backward (each
    stage's with PP: pipeline.OverlappedStage), which hides part of it; zero-bubble reduces
    after its schedule, where nothing does."""
    config, hw = get_preset("emu-14b"), HARDWARE["a100-80g"]
    work = Workload(1, 352, 1024, 2)

    def dims(tp, pp, schedule="1f1b"):
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  data_parallel_sharding="fsdp", pipeline_balance="auto", pipeline_schedule=schedule)
        return ParallelDims.from_config(parallel, 128, config, seq_length=1024)

    counts = parameter_counts(config)
    zero_bubble = dims(2, 2, "zero-bubble")
    stage_params = (max(sum(zero_bubble.stage_layers[s] * counts["layer"] for s in rank_stages(zero_bubble, r))
                        for r in range(2)) + counts["encoder"] + counts["embed"] + counts["head"] / 2) / 2
    reduce_scatter = allreduce_seconds(4 * stage_params, zero_bubble.dp, hw.inter_node_gbs) / 2
    time = estimate_step_time(config, work, zero_bubble, hw)
    assert time["dp_exposed_s"] == pytest.approx(reduce_scatter)  # gathers hide, the reduce-scatter does not
    assert 0.25 < time["exposed_comm_fraction"] < 0.35 and time["mfu"] < 0.36
    # 1F1B: the stage's last backward hides part of its reduce-scatter, not all (0.6 s at DP=32).
    one_f_one_b = estimate_step_time(config, work, dims(2, 2), hw)["dp_exposed_s"]
    assert 0 < one_f_one_b < allreduce_seconds(4 * stage_params, 32, hw.inter_node_gbs) / 2
    # Without PP (DDP: no gathers) the last micro-batch's backward hides part of the all-reduce.
    ddp = ParallelDims.from_config(ParallelConfig(tensor_model_parallel_size=4), 128, config)
    replicas = (counts["encoder"] + counts["embed"] + config.llm.layers * counts["layer"] + counts["head"]) / 4
    full_allreduce = allreduce_seconds(4 * replicas, ddp.dp, hw.inter_node_gbs)
    assert 0 < estimate_step_time(config, work, ddp, hw)["dp_exposed_s"] < full_allreduce


def test_plan_states_its_assumptions(capsys):
    load_tool("plan").main(["--preset", "emu-14b", "--gpus", "128", "--gpu", "a100-80g", "--top", "3"])
    out = capsys.readouterr().out
    assert "assumed: matmul-bound blocks at 50% of peak" in out and "exposed comm" in out
    assert "--pipeline-balance auto" in out


def test_step_time_counts_the_encoders_as_placed():
    """--vision-tensor-parallel: a head-split encoder runs 1/TP of its FLOPs with two
    all-reduces per block each way; an image-split one runs ceil(images / TP) images whole,
    gathers its outputs and all-reduces its fp32 gradients once a step; a replicated one runs
    everything. Worked values at emu-14b, TP4, 2 images per micro-batch."""
    from megatron_emu.parallel.planner_encoders import encoder_rank_flops, encoder_shares, encoder_tp_bytes

    config, hw = get_preset("emu-14b"), HARDWARE["a100-80g"]
    shares = encoder_shares(config)
    assert sum(shares.values()) == pytest.approx(1.0) and shares["visual"] > 0.9  # EVA-CLIP-g dominates
    heads, images = {"visual": "heads", "causal_former": "heads"}, {"visual": "images", "causal_former": "images"}
    mixed = {"visual": "heads", "causal_former": "replicated"}
    assert encoder_rank_flops(config, 100.0, 2, 4, heads) == pytest.approx(25.0)
    assert encoder_rank_flops(config, 100.0, 2, 4, images) == pytest.approx(50.0)  # ceil(2 / 4) of 2 images
    assert encoder_rank_flops(config, 100.0, 8, 4, images) == pytest.approx(25.0)
    assert encoder_rank_flops(config, 100.0, 2, 4, mixed) == pytest.approx(25.0 * shares["visual"]
                                                                           + 100.0 * shares["causal_former"])
    v, c = config.vision, config.causal_former
    assert encoder_tp_bytes(config, 2, 2, heads) == dict(
        allreduce=4 * 2 * 2 * (v.layers * v.num_tokens * v.width + c.layers * c.num_query_tokens * c.d_model),
        gather=0.0, step_allreduce=0.0)
    meta = build_emu(config, device="meta")
    params = {name: sum(p.numel() for p in getattr(meta, name).parameters()) for name in ("visual", "causal_former")}
    assert encoder_tp_bytes(config, 2, 2, images) == dict(
        allreduce=0.0, gather=2 * 2 * (v.num_tokens * v.width + c.num_query_tokens * config.llm.hidden),
        step_allreduce=4 * (params["visual"] + params["causal_former"]))

    def step(placement):
        dims = ParallelDims.from_config(ParallelConfig(tensor_model_parallel_size=4, data_parallel_sharding="fsdp"),
                                        8, config, seq_length=1024)
        return dims, estimate_step_time(config, Workload(1, 16, 1024, 2, vision_tensor_parallel=placement), dims, hw)

    dims, by_heads = step("heads")
    _, by_images = step("images")
    assert by_heads["encoder_grads_s"] == 0.0
    assert by_images["encoder_grads_s"] == pytest.approx(
        allreduce_seconds(4 * (params["visual"] + params["causal_former"]) / dims.dp_shard, 4, hw.intra_node_gbs))
    # Two images over four ranks: each rank runs the whole ViT on one (padded) image, half the
    # images of the micro-batch, then the gradient all-reduce: slower than splitting the heads.
    assert by_images["seconds"] > by_heads["seconds"]
