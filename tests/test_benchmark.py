"""tools/benchmark_throughput.py: one small run end to end, and its pieces."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.random_batches import random_batch
from megatron_emu.model.emu import build_emu
from megatron_emu.training.metrics import training_flops

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark_throughput", ROOT / "tools" / "benchmark_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench_ops = sys.modules["benchmark_ops"]  # tools/benchmark_ops.py, imported by the benchmark

SMALL = ["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "96",
         "--warmup-iters", "1", "--timed-iters", "1", "--peak-tflops", "2.0"]


def test_random_batch_is_well_formed():
    config = get_preset("tiny")
    batch = random_batch(config, batch_size=3, seq_length=120, images_per_sample=2, seed=0)
    assert batch["tokens"].shape == (3, 120) and batch["images"].shape == (6, 3, 224, 224)
    assert int((batch["tokens"] == config.special_tokens.image).sum()) == 6 * 32
    out = build_emu(config, seed=0)(batch["tokens"], batch["images"])  # the model accepts it
    assert out.logits.shape == (3, 120, config.llm.vocab_size)
    with pytest.raises(ValueError, match="cannot hold 3 images"):
        random_batch(config, 1, 64, 3, seed=0)


def test_benchmark_reports_consistent_figures(capsys):
    row = bench.main(SMALL + ["--compare", "hf", "--recompute-activations"])
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1].removeprefix("BENCHMARK_JSON ")) == json.loads(json.dumps(row))
    seconds = row["step_ms"] / 1000
    assert row["tokens_per_s"] == pytest.approx(2 * 96 / seconds)
    assert row["samples_per_s"] == pytest.approx(2 / seconds)
    flops = training_flops(get_preset("tiny"), 2, 96, 2, "selective")
    assert row["tflops_per_device"] == pytest.approx(flops / seconds / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 2.0)
    assert row["peak_source"] == "--peak-tflops" and row["recompute"] == "selective"
    # Weights + grads + Adam alone are ~22 MB for tiny; the tracked peak must exceed them.
    assert row["peak_memory_mib_per_rank"][0] > 20
    assert row["ratio_vs_hf"] == pytest.approx(row["text_only_tokens_per_s"] / row["hf_tokens_per_s"])


def test_data_only_delegates_to_the_data_benchmark(monkeypatch):
    seen = []
    fake = types.ModuleType("benchmark_data")
    fake.run_data_benchmark = lambda args: seen.append(args) or {"loader": []}
    monkeypatch.setitem(sys.modules, "benchmark_data", fake)
    assert bench.main(["--data-only", "--some-data-flag", "3"]) == {"loader": []}
    assert seen == [["--some-data-flag", "3"]]


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        bench.main(SMALL + ["--no-such-flag"])


def test_device_peak_sources():
    peak, source = bench.device_peak_tflops(torch.device("cpu"), torch.float32)
    assert peak > 0 and source.startswith("measured CPU matmul peak")
    assert bench.device_peak_tflops(torch.device("cpu"), torch.float32, 123.0) == (123.0, "--peak-tflops")


def test_corpus_batches_packed_count_rows_not_samples(tmp_path):
    """--corpus-batches --pack-sequences: the same samples in fewer rows; tokens/s and
    FLOPs follow the rows computed, samples/s the samples."""
    flags = ["--preset", "tiny", "--micro-batch-size", "6", "--global-batch-size", "6", "--seq-length", "160",
             "--warmup-iters", "0", "--timed-iters", "1", "--peak-tflops", "2.0", "--no-memory", "--corpus-batches",
             "--data-cache-dir", str(tmp_path), "--num-workers", "0"]
    padded, packed = bench.main(flags), bench.main(flags + ["--pack-sequences", "--compare", "unpacked"])
    assert padded["rows_per_step"] == 6 and packed["pack_sequences"]
    assert 0 < packed["rows_per_step"] < 6 and packed["images_per_step"] == padded["images_per_step"]
    seconds = packed["step_ms"] / 1000
    assert packed["tokens_per_s"] == pytest.approx(packed["rows_per_step"] * 160 / seconds)
    assert packed["samples_per_s"] == pytest.approx(6 / seconds)
    flops = training_flops(get_preset("tiny"), packed["rows_per_step"], 160, packed["images_per_step"])
    assert packed["tflops_per_device"] == pytest.approx(flops / seconds / 1e12)
    assert packed["packing_speedup"] == pytest.approx(packed["unpacked_step_ms"] / packed["step_ms"])
    with pytest.raises(ValueError, match="needs --pack-sequences"):
        bench.main(flags + ["--compare", "unpacked"])


def optimizer_kind(optimizer) -> tuple:
    """What makes two AdamWs the same run: class, kernel flags, hyper-parameters, groups."""
    flags = {k: optimizer.defaults.get(k) for k in ("fused", "foreach", "betas", "eps")}
    groups = [(g["name"], len(g["params"]), g["weight_decay"], g["max_lr"]) for g in optimizer.param_groups]
    return type(optimizer), flags, groups


def compare_builds(rank: int, world: int, flags: list[str]) -> None:
    """Pretraining (stopped right after its build) and the benchmark build the same AdamW."""
    from megatron_emu.training import build, train

    parser = bench.build_parser()
    bench.add_benchmark_args(parser)
    config = bench.to_config(parser.parse_args(SMALL + flags))

    class Built(Exception):
        """Stops pretraining right after its build."""

    runs = []

    def build_and_stop(cfg):
        runs.append(build.build_run(cfg))
        raise Built

    real, train.build_run = train.build_run, build_and_stop
    try:
        with pytest.raises(Built):
            train.pretrain(config)
    finally:
        train.build_run = real
        if runs:
            runs[0].close()
    ours = bench.prepare_emu(config, 1)
    ours["run"].close()
    assert ours["world_size"] == world
    assert optimizer_kind(ours["run"].optimizer) == optimizer_kind(runs[0].optimizer)
    assert bool(ours["run"].optimizer.defaults["fused"]) == ("--no-fused-kernels" not in flags)


@pytest.mark.parametrize("flags", [[], ["--no-fused-kernels"]], ids=["fused", "unfused"])
def test_benchmark_times_the_optimizer_pretraining_builds(flags):
    """Both build through training/build.py's build_run: the benchmark once built its multi-rank
    AdamW without the fused flag, so it timed another AdamW than pretraining ran."""
    compare_builds(0, 1, flags)


def test_benchmark_times_the_optimizer_pretraining_builds_two_ranks():
    """The same under FSDP2 on 2 gloo ranks (DTensor parameters: groups split by mesh)."""
    from tests.dist_utils import spawn

    spawn(2, compare_builds, ["--global-batch-size", "4", "--data-parallel-sharding", "fsdp"])


def test_profile_ops_reports_the_matmul_share_of_both_sides(capsys):
    row = bench.main(SMALL + ["--compare", "hf", "--profile-ops", "--profile-steps", "1", "--no-memory"])
    out = capsys.readouterr().out
    profiles = row["op_profile"]
    assert set(profiles) == {"ours", "transformers"}
    for name, p in profiles.items():
        assert 0 < p["matmul_share"] < 1 and 0 <= p["attention_share"] < 1
        assert p["matmul_share"] + p["attention_share"] + sum(s for _, s in p["top_other_ops"]) <= 1 + 1e-6
        assert all(op not in bench_ops.MATMUL_OPS for op, _ in p["top_other_ops"])
        assert f"op profile [{name}]: matmul {p['matmul_share']:.1%}" in out


def test_llm_shape_takes_another_presets_widths():
    parser = bench.build_parser()
    bench_ops.add_ops_args(parser)
    args = parser.parse_args(["--preset", "tiny", "--llm-shape", "1b", "--llm-layers", "2"])
    config = bench_ops.apply_llm_shape(bench.to_config(args), args)
    llm, wide = config.model.llm, get_preset("1b").llm
    assert (llm.hidden, llm.heads, llm.ffn_dim, llm.vocab_size, llm.layers) == (
        wide.hidden, wide.heads, wide.ffn_dim, wide.vocab_size, 2)
    assert config.model.vision == get_preset("tiny").vision  # the vision side stays tiny
    with pytest.raises(ValueError, match="--llm-layers must be >= 1"):
        bench_ops.apply_llm_shape(bench.to_config(args), parser.parse_args(["--llm-layers", "0"]))


def test_compare_hf_times_both_sides_at_their_initial_weights(monkeypatch):
    """Ours steps twice a round (image and text-only step, one model) to transformers' once:
    at a learning rate it drifted sooner into subnormal gradients (slow on x86), so the
    comparison freezes both (lr 0: the same AdamW work, weights unchanged)."""
    frozen = []
    real = bench.freeze_weights

    def spy(*optimizers):
        real(*optimizers)
        frozen.extend((o, [p.detach().clone() for g in o.param_groups for p in g["params"]]) for o in optimizers)

    monkeypatch.setattr(bench, "freeze_weights", spy)
    bench.main(SMALL + ["--compare", "hf", "--no-memory"])
    assert len(frozen) == 2  # ours and transformers
    for optimizer, before in frozen:
        after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
        assert all(g["lr"] == 0.0 for g in optimizer.param_groups)
        assert all(torch.equal(a, b) for a, b in zip(after, before))
