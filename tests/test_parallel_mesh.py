"""ParallelDims: sizes validated once, with one clear error; pipeline stage layouts."""

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.config import DataConfig, ParallelConfig, get_preset
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
