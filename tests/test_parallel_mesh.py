"""ParallelDims: sizes validated once, with one clear error; pipeline stage layouts."""

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.config import DataConfig, ParallelConfig, get_preset
from megatron_emu.parallel.balance import balanced_stage_layers, emu_stage_cost
from megatron_emu.parallel.mesh import ParallelDims, pipeline_layout

TINY = get_preset("tiny")  # LLaMA: 4 layers, 4 heads, vocab 516


def dims(world=8, **kw) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**kw), world, TINY)


def test_data_parallel_size_is_the_rest():
    d = dims(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert (d.tp, d.pp, d.dp) == (2, 2, 2)
    assert d.validate(TINY, DataConfig(seq_length=64, micro_batch_size=1, global_batch_size=8)) == 4


@pytest.mark.parametrize("world, kw, message", [
    (6, dict(tensor_model_parallel_size=4), "world size 6 is not divisible"),
    (2, dict(sequence_parallel=True), "--sequence-parallel needs"),
    (2, dict(pipeline_model_parallel_size=2, pipeline_schedule="gpipe"), "--pipeline-schedule"),
    (4, dict(data_parallel_sharding="hsdp", num_distributed_optimizer_instances=3), "does not divide"),
    (3, dict(pipeline_model_parallel_size=3), "cannot be split evenly"),
    (2, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), "needs --pipeline-schedule interleaved"),
    (2, dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=5), "do not fit"),
])
def test_bad_layouts_fail_once_with_the_flag(world, kw, message):
    with pytest.raises(ValueError, match=message):
        dims(world, **kw)


@pytest.mark.parametrize("tp, data, message", [
    (8, DataConfig(seq_length=64, micro_batch_size=1, global_batch_size=8), "LLaMA heads 4"),
    (2, DataConfig(seq_length=64, micro_batch_size=3, global_batch_size=8), "--global-batch-size 8"),
])
def test_model_and_batch_checked_against_layout(tp, data, message):
    with pytest.raises(ValueError, match=message):
        dims(tp, tensor_model_parallel_size=tp).validate(TINY, data)


def test_too_few_microbatches_for_pipeline():
    d = dims(2, pipeline_model_parallel_size=2, pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1)
    with pytest.raises(ValueError, match="fewer than the 4 pipeline stages"):
        d.validate(TINY, DataConfig(seq_length=64, micro_batch_size=1, global_batch_size=2))


@pytest.mark.parametrize("kw, virtual, layers", [
    (dict(pipeline_model_parallel_size=2), 1, (2, 2)),
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1), 1, (1, 3)),
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=3), 1, (1, 3)),
    (dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1), 2, (1, 1, 1, 1)),
    (dict(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble"), 2, (1, 1, 1, 1)),
])
def test_stage_layers(kw, virtual, layers):
    assert pipeline_layout(ParallelConfig(**kw), 4) == (virtual, layers)


def test_flags_fill_parallel_config():
    c = parse_args(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                    "--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "1",
                    "--use-distributed-optimizer", "--decoder-first-pipeline-num-layers", "1"])
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel) == (2, 2, True)
    assert (p.pipeline_schedule, p.num_layers_per_virtual_pipeline_stage, p.data_parallel_sharding) == ("interleaved", 1, "fsdp")
    assert p.decoder_first_pipeline_num_layers == 1
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        parse_args(["--use-distributed-optimizer", "--data-parallel-sharding", "ddp"])


# -- --pipeline-balance auto ----------------------------------------------------------------
def compositions(total: int, parts: int):
    """Every way to give `parts` stages >= 1 layer each summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


@pytest.mark.parametrize("first_extra, last_extra", [(0.0, 0.0), (1.6, 0.6), (3.3, 0.4), (0.0, 2.5), (7.0, 7.0)])
@pytest.mark.parametrize("layers, stages", [(4, 2), (7, 3), (10, 4), (9, 5)])
def test_balanced_split_is_the_cheapest_bottleneck(layers, stages, first_extra, last_extra):
    cost = lambda n, first, last: n + first * first_extra + last * last_extra  # noqa: E731
    split = balanced_stage_layers(layers, stages, cost)
    bottleneck = lambda s: max(cost(n, i == 0, i == len(s) - 1) for i, n in enumerate(s))  # noqa: E731
    assert sum(split) == layers and len(split) == stages and min(split) >= 1
    assert bottleneck(split) == min(bottleneck(s) for s in compositions(layers, stages))


def test_auto_balance_unloads_emu_14b_first_stage():
    """emu-14b at the paper's mix: stage 0's ViT + Causal Former cost ~1.65 LLaMA layers."""
    emu = get_preset("emu-14b")
    parallel = ParallelConfig(pipeline_model_parallel_size=4, pipeline_balance="auto")
    d = ParallelDims.from_config(parallel, 128, emu, seq_length=1024)
    assert d.stage_layers == (9, 11, 10, 10)
    cost = emu_stage_cost(emu, 1024, 2.0)
    stage_costs = lambda s: [cost(n, i == 0, i == len(s) - 1) for i, n in enumerate(s)]  # noqa: E731
    assert max(stage_costs(d.stage_layers)) < max(stage_costs((10, 10, 10, 10)))
    # More images per sample move more layers off the first stage.
    heavy = ParallelConfig(pipeline_model_parallel_size=4, pipeline_balance="auto", pipeline_balance_images_per_sample=8)
    assert ParallelDims.from_config(heavy, 128, emu, seq_length=1024).stage_layers[0] < 9


@pytest.mark.parametrize("kw, message", [
    (dict(decoder_first_pipeline_num_layers=1), "drop --decoder-first/last"),
    (dict(pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1), "drop --decoder-first/last"),
])
def test_auto_balance_refuses_hand_placed_layers(kw, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.from_config(ParallelConfig(pipeline_model_parallel_size=2, pipeline_balance="auto", **kw),
                                 2, TINY, seq_length=64)


def test_auto_balance_flags_and_schedules():
    c = parse_args(["--pipeline-model-parallel-size", "2", "--pipeline-balance", "auto",
                    "--pipeline-balance-images-per-sample", "3"])
    assert (c.parallel.pipeline_balance, c.parallel.pipeline_balance_images_per_sample) == ("auto", 3.0)
    assert ParallelDims.from_config(c.parallel, 2, TINY, c.data.seq_length).stage_layers == (1, 3)
    # The parity test's "PP2 1F1B auto-balanced" layout (80 tokens) really is uneven.
    auto = ParallelConfig(pipeline_model_parallel_size=2, pipeline_balance="auto")
    assert ParallelDims.from_config(auto, 2, TINY, seq_length=80).stage_layers == (1, 3)
    zbv = ParallelConfig(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble", pipeline_balance="auto")
    assert ParallelDims.from_config(zbv, 2, TINY, seq_length=64).stage_layers == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="needs the sequence length"):
        ParallelDims.from_config(c.parallel, 2, TINY)
