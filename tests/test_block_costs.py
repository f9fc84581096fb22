"""--pipeline-balance-costs: stages weighed by measured per-block times (parallel/block_costs.py)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_emu.arguments import parse_args
from megatron_emu.config import DataConfig, ParallelConfig, get_preset
from megatron_emu.parallel.block_costs import FORMAT, block_shapes, load_costs, write_costs
from megatron_emu.parallel.mesh import ParallelDims
from megatron_emu.parallel.planner import candidate_dims

ROOT = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
EIGHT = dataclasses.replace(TINY, llm=dataclasses.replace(TINY.llm, layers=8))  # tiny widths, 8 LLaMA layers
SEQ = 96


def costs_file(tmp_path, model, vision_block: float, **seconds) -> str:
    path = tmp_path / f"costs_{vision_block}.json"
    base = dict(vision_block=vision_block, causal_former_block=0.0, encoder_rest=0.0, llm_layer=1.0, head=0.0)
    write_costs(path, model, SEQ, {**base, **seconds}, {"by": "hand"})
    return str(path)


def split(model, path: str, images_per_sample: float = 2.0) -> tuple[int, ...]:
    parallel = ParallelConfig(pipeline_model_parallel_size=2, pipeline_balance="auto",
                              pipeline_balance_images_per_sample=images_per_sample, pipeline_balance_costs=path)
    return ParallelDims.from_config(parallel, 2, model, SEQ).stage_layers


def test_a_costlier_vit_moves_layers_off_the_first_stage(tmp_path):
    """8 LLaMA layers at 1 s each, 2 ViT blocks x 2 images per sample on stage 0: its extra
    is 4 x vision_block. By hand, the costliest stage of each split:
      vision 0.2 s (extra 0.8): [4, 4] 4.8, [3, 5] 5 -> [4, 4]
      vision 0.4 s (extra 1.6): [4, 4] 5.6, [3, 5] 5 -> [3, 5]
      vision 0.8 s (extra 3.2): [3, 5] 6.2, [2, 6] 6 -> [2, 6]"""
    assert split(EIGHT, costs_file(tmp_path, EIGHT, 0.2)) == (4, 4)
    assert split(EIGHT, costs_file(tmp_path, EIGHT, 0.4)) == (3, 5)
    assert split(EIGHT, costs_file(tmp_path, EIGHT, 0.8)) == (2, 6)
    # The last stage's head counts too: a 2 s head (with the 0.4 s ViT) gives [4, 4] (5.6 : 6 vs [5, 3] 6.6).
    assert split(EIGHT, costs_file(tmp_path, EIGHT, 0.4, head=2.0)) == (4, 4)
    # Per image: fewer images per sample, a lighter first stage ([4, 4] at 0.8 s x 2 blocks x 0.5 images).
    assert split(EIGHT, costs_file(tmp_path, EIGHT, 0.8), images_per_sample=0.5) == (4, 4)


def test_flag_reaches_the_split(tmp_path):
    path = costs_file(tmp_path, TINY, 5.0)  # ViT far heavier than tiny's FLOPs say
    config = parse_args(["--preset", "tiny", "--seq-length", str(SEQ), "--pipeline-model-parallel-size", "2",
                         "--pipeline-balance", "auto", "--pipeline-balance-costs", path])
    assert config.parallel.pipeline_balance_costs == path
    dims = ParallelDims.from_config(config.parallel, 2, config.model, config.data.seq_length)
    assert dims.stage_layers == (1, 3)
    light = costs_file(tmp_path, TINY, 0.01)  # ViT nearly free: the even split
    assert ParallelDims.from_config(dataclasses.replace(config.parallel, pipeline_balance_costs=light), 2,
                                    config.model, SEQ).stage_layers == (2, 2)


def _write(tmp_path, document) -> str:
    path = tmp_path / "bad.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


GOOD = {"vision_block": 1.0, "causal_former_block": 1.0, "encoder_rest": 1.0, "llm_layer": 1.0, "head": 1.0}


@pytest.mark.parametrize("document, message", [
    ("{not json", "not JSON"),
    ({"seconds": GOOD}, "not a block-costs file"),
    ({"format": FORMAT, "seconds": GOOD}, "must be objects"),
    ({"format": FORMAT, "shapes": block_shapes(TINY, SEQ), "seconds": {**GOOD, "head": -1}}, "seconds.head must be"),
    ({"format": FORMAT, "shapes": block_shapes(TINY, SEQ), "seconds": {**GOOD, "llm_layer": "fast"}},
     "seconds.llm_layer must be"),
    ({"format": FORMAT, "shapes": block_shapes(TINY, SEQ), "seconds": {**GOOD, "llm_layer": 0}}, "must be > 0"),
    ({"format": FORMAT, "shapes": block_shapes(TINY, 128), "seconds": GOOD}, "seq_length = 128, this run has 96"),
    ({"format": FORMAT, "shapes": block_shapes(get_preset("1b"), SEQ), "seconds": GOOD}, "llm_hidden = "),
])
def test_bad_costs_files_are_one_line_errors(tmp_path, document, message):
    path = _write(tmp_path, document)
    with pytest.raises(ValueError, match=message) as error:
        load_costs(path, TINY, SEQ)
    text = str(error.value)
    assert text.startswith(f"--pipeline-balance-costs {path}: ") and "\n" not in text
    with pytest.raises(ValueError, match=message):  # the same through the layout
        split(TINY, path)


def test_missing_file_and_misplaced_flag(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=f"--pipeline-balance-costs {missing}: cannot read it"):
        split(TINY, missing)
    with pytest.raises(ValueError, match="read by --pipeline-balance auto"):
        ParallelDims.from_config(ParallelConfig(pipeline_model_parallel_size=2, pipeline_balance_costs=missing),
                                 2, TINY, SEQ)
    # The planner reports a bad file instead of skipping every pipelined layout.
    with pytest.raises(ValueError, match="cannot read it"):
        list(candidate_dims(TINY, DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=8), 4,
                            costs_file=missing))


def test_planner_splits_by_the_costs_file(tmp_path):
    data = DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=8)
    for vision, expected in ((0.2, (4, 4)), (0.8, (2, 6))):
        path = costs_file(tmp_path, EIGHT, vision)
        pp2 = [d for d in candidate_dims(EIGHT, data, 2, costs_file=path) if d.pp == 2 and d.schedule == "1f1b"]
        assert pp2 and all(d.stage_layers == expected for d in pp2)


def test_benchmark_measures_a_file_the_balancer_reads(tmp_path):
    """tools/benchmark_throughput.py --measure-block-costs at tiny shapes: every kind timed,
    and the file it writes is accepted by --pipeline-balance-costs at the same shapes."""
    spec = importlib.util.spec_from_file_location("benchmark_throughput", ROOT / "tools" / "benchmark_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = str(tmp_path / "measured.json")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        row = bench.main(["--preset", "tiny", "--device", "cpu", "--seq-length", str(SEQ), "--micro-batch-size", "2",
                          "--images-per-sample", "2", "--warmup-iters", "1", "--timed-iters", "3",
                          "--measure-block-costs", path])
    finally:
        torch.set_num_threads(threads)
    seconds = load_costs(path, TINY, SEQ)
    assert seconds == row["seconds"] and all(v > 0 for v in seconds.values())
    assert sum(split(TINY, path)) == TINY.llm.layers
    with pytest.raises(ValueError, match="seq_length = 96, this run has 128"):
        load_costs(path, TINY, 128)
