"""Watching a run: TensorBoard and W&B receive what the log line prints, from one rank;
timers and the straggler report; level 0 adds no collective; a missing package is one line.

Runs are tiny (2 iterations); multi-rank runs are 2 gloo ranks under PP2.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from megatron_emu.arguments import parse_args
from megatron_emu.data.loader import ensure_synthetic_corpus
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.training import train
from megatron_emu.training.timers import Timers
from tests.dist_utils import spawn
from tests.monitor_logs import (PRINTED, close_to_printed, log_lines, read_events, read_wandb_run, scalars_at,
                                validation_lines)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_STEP_TAGS = ("lm loss", "l2 loss", "learning-rate", "grad-norm", "batch-size", "consumed-samples",
                 "images-per-step", "truncated-tokens", "dropped-images", "packing-efficiency",
                 "learning-rate/LLaMA", "learning-rate/EVA-CLIP", "learning-rate/Causal Former")
LOG_LINE_TAGS = ("iteration-time", "tokens-per-sec", "tflops-per-device", "mfu")


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("monitor-cache"))
    data_path = ensure_synthetic_corpus(cache, EmuTokenizer(build_tiny_tokenizer(cache)), sizes={"pairs": 60})
    return ["--preset", "tiny", "--data-path", *data_path, "--data-cache-dir", cache, "--seq-length", "48",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--num-workers", "0", "--train-iters", "2",
            "--log-interval", "1"]


def check_sink_matches_log(values: dict[str, dict[int, float]], out: str) -> None:
    """Every per-step and log-line tag has the log line's value at each logged iteration."""
    printed = log_lines(out)
    assert sorted(printed) == [1, 2]
    for tag, field, tolerance in PRINTED:
        for iteration, line in printed.items():
            assert close_to_printed(values[tag][iteration], line[field], tolerance), (tag, iteration)
    for iteration, line in printed.items():
        assert values["iteration-time"][iteration] * 1000 == pytest.approx(line["ms"], abs=0.06)
        assert 0 < values["mfu"][iteration] < 1
    (lm, ppl, l2), = validation_lines(out).values()
    assert values["lm loss validation"][2] == pytest.approx(lm, rel=2e-6)
    assert values["lm loss validation ppl"][2] == pytest.approx(ppl, rel=2e-6)
    assert values["l2 loss validation"][2] == pytest.approx(l2, rel=2e-6)


def test_tensorboard_and_wandb_get_the_log_line(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb, wb = str(tmp_path / "tb"), str(tmp_path / "wb")
    train.pretrain(parse_args(flags + [
        "--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "1", "--tensorboard-dir", tb,
        "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard", "--timing-log-level", "1",
        "--log-timers-to-tensorboard", "--wandb-project", "emu-test", "--wandb-exp-name", "tiny",
        "--wandb-save-dir", wb]))
    out = capsys.readouterr().out

    events = read_events(tb)
    tags = set(events.Tags()["scalars"])
    expected = PER_STEP_TAGS + LOG_LINE_TAGS + ("lm loss validation", "lm loss validation ppl", "l2 loss validation",
                                                "mem-max-rss-bytes", "forward-backward-time", "data-loader-wait-time")
    for tag in expected:
        assert tag in tags and f"{tag} vs samples" in tags, tag
    tb_values = {tag: scalars_at(events, tag) for tag in tags}
    check_sink_matches_log(tb_values, out)
    assert tb_values["lm loss vs samples"] == {8: tb_values["lm loss"][1], 16: tb_values["lm loss"][2]}
    assert tb_values["images-per-step"][1] > 0 and 0 < tb_values["packing-efficiency"][1] <= 1
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"train_iters": 2' in config_text and '"tensorboard_dir"' in config_text
    assert "[Rank 0] (after 1 iterations) memory (MB) | max RSS (CPU: peak resident set of this process):" in out

    config, history = read_wandb_run(os.path.join(wb, "wandb", "offline-run-*", "run-*.wandb"))
    assert config["train_iters"] == 2 and config["logging"]["wandb_project"] == "emu-test"
    wandb_values = {tag: {step: row[tag] for step, row in history.items() if tag in row}
                    for tag in {t for row in history.values() for t in row}}
    check_sink_matches_log(wandb_values, out)
    assert set(PER_STEP_TAGS + LOG_LINE_TAGS) <= set(wandb_values)


def test_missing_wandb_is_one_line_error(flags, tmp_path):
    """`wandb` hidden from the import system: pretrain_emu.py stops with one line naming the flag."""
    code = ("import sys, runpy; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "pretrain_emu.py"), *flags,
                             "--wandb-project", "p"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("--wandb-project needs the wandb package: pip install wandb"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_cuda_timers_synchronise_only_when_the_level_asks(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    cuda = torch.device("cuda", 0)  # no GPU needed: the synchronisation is what is counted
    for level, name, expected in ((0, "forward-backward", 0), (1, "forward-backward", 2), (1, "batch-generator", 0),
                                  (2, "batch-generator", 2)):
        syncs.clear()
        with Timers(level, cuda)(name):
            pass
        assert len(syncs) == expected, (level, name)


# -- two ranks: collectives per timing level ---------------------------------------------------
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "barrier", "broadcast",
               "reduce_scatter_tensor", "gather", "reduce", "batch_isend_irecv")  # isend / irecv: P2POp checks their identity


class _NoTimers:
    """The loop with no timers at all: what level 0 is compared with."""

    def __call__(self, name):
        return contextlib.nullcontext()

    def pipeline_waits(self):
        return contextlib.nullcontext()


class _NoMonitor:
    def __init__(self, *args, **kwargs):
        self.timers = _NoTimers()

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _count_collectives(rank, world, flags, results):
    counts = Counter()
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    runs = {}
    for label, extra, monitor in (("none", [], _NoMonitor), ("level 0", ["--timing-log-level", "0"], train.TrainingMonitor),
                                  ("level 1", ["--timing-log-level", "1"], train.TrainingMonitor)):
        train.TrainingMonitor = monitor
        counts.clear()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train.pretrain(parse_args(flags + extra))
        runs[label] = dict(counts)
    torch.save(runs, os.path.join(results, f"rank{rank}.pt"))


def test_level_0_adds_no_collective(flags, tmp_path):
    pp2 = flags + ["--pipeline-model-parallel-size", "2", "--split", "100,0,0", "--eval-interval", "0"]
    spawn(2, _count_collectives, pp2, str(tmp_path))
    for rank in range(2):
        runs = torch.load(tmp_path / f"rank{rank}.pt")
        assert runs["level 0"] == runs["none"], rank
        assert runs["none"].get("batch_isend_irecv", 0) > 0  # the counting sees the step's collectives
        assert runs["level 1"]["barrier"] > runs["none"].get("barrier", 0)  # ... and the timers' ones
        assert runs["level 1"]["all_gather"] > runs["none"].get("all_gather", 0)


# -- two ranks under PP2: one writer, per-rank timers, a slow rank ------------------------------
SLOW_SECONDS = 1.0  # per micro-batch on rank 0: well above the tiny step's compute


class _SlowLoader:
    """The training loader, each micro-batch late by SLOW_SECONDS."""

    def __init__(self, loader):
        self.loader = loader

    def __next__(self):
        time.sleep(SLOW_SECONDS)
        return next(self.loader)

    def __getattr__(self, name):  # state_dict, totals, consumed_samples, ...
        return getattr(self.loader, name)


def _run_watched(rank, world, flags, out_dir):
    if rank == 0:  # the first stage's data path is slow on purpose
        build = train.build_pretrain_loader

        def slow_training_loader(*args, **kwargs):
            loader = build(*args, **kwargs)
            return _SlowLoader(loader) if kwargs.get("split", "train") == "train" else loader

        train.build_pretrain_loader = slow_training_loader
    with open(os.path.join(out_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f, contextlib.redirect_stdout(f):
        train.pretrain(parse_args(flags))


@pytest.fixture(scope="module")
def watched_pp2(flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("watched-pp2")
    tb = str(out / "tb")
    spawn(2, _run_watched, flags + [
        "--pipeline-model-parallel-size", "2", "--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "1",
        "--tensorboard-dir", tb, "--log-validation-ppl-to-tensorboard", "--timing-log-level", "2",
        "--log-straggler", "--straggler-interval", "2"], str(out))
    return out, tb


def test_pp2_tensorboard_written_by_one_rank(watched_pp2):
    out, tb = watched_pp2
    (event_file,) = glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    writer_pid = (out / "rank1.pid").read_text()  # last stage, TP rank 0, DP rank 0
    assert event_file.split(".")[-2] == writer_pid
    events = read_events(tb)
    values = {tag: scalars_at(events, tag) for tag in events.Tags()["scalars"]}
    last_stage_log = (out / "rank1.txt").read_text()
    assert log_lines((out / "rank0.txt").read_text()) == {}  # the last rank prints the log line
    check_sink_matches_log(values, last_stage_log)


def test_slow_data_rank_is_the_straggler_as_data_loader_wait(watched_pp2):
    out, _ = watched_pp2
    text = (out / "rank1.txt").read_text()
    (line,) = [l for l in text.splitlines() if l.startswith("straggler report (iterations 1-2")]
    assert " | rank 0 (" in line and " | rank 1 (" not in line, line
    phases = dict(p.rsplit(" ", 2)[:2] for p in line.split("): ")[-1].split(", "))
    assert float(phases["data-loader-wait"]) == max(float(v) for v in phases.values()), line
    # Level 2: every rank's times; the wait is rank 0's data path, not rank 1's compute.
    block = text.split("times across ranks (ms):")[-1]
    wait = re.search(r"    data-loader-wait:\n     rank  0: (\S+)\n     rank  1: (\S+)\n", block)
    assert float(wait[1]) > 2 * float(wait[2]), block
    assert "pipeline-p2p-wait:" in block


def test_timer_block_and_straggler_report_formats():
    """Four ranks: rank 2 loads data slowly; a phase nobody ran in the interval is left out."""
    from megatron_emu.training.timers import format_timers, straggler_report

    names = ["data-loader-wait", "forward-backward", "grads-reduce", "optimizer", "validation"]
    times = torch.tensor([[1.0, 100.0, 0.5, 10.0, 0.0]] * 4)
    times[2, 0] = 80.0
    assert format_timers(names, times, 1).splitlines() == [
        "(min, max) time across ranks (ms):",
        "    data-loader-wait ...............................: (1.00, 80.00)",
        "    forward-backward ...............................: (100.00, 100.00)",
        "    grads-reduce ...................................: (0.50, 0.50)",
        "    optimizer ......................................: (10.00, 10.00)",
    ]
    assert "     rank  2: 80.00" in format_timers(names, times, 2).splitlines()
    report = straggler_report(names, times, ["a", "b", "c", "d"], 10.0, 11, 20)
    assert report == ("straggler report (iterations 11-20, step time = sum of timed phases, threshold +10%): "
                      "median 111.5 ms | rank 2 (c): 190.5 ms (+70.9%): data-loader-wait 80.0 ms, "
                      "forward-backward 100.0 ms, grads-reduce 0.5 ms, optimizer 10.0 ms")
    assert straggler_report(names, times, list("abcd"), 80.0, 11, 20).endswith("| no straggler")


def test_memory_line_is_megatrons():
    from megatron_emu.training.monitor import memory_line

    mb = 1024 * 1024
    cuda = {"mem-allocated-bytes": 10 * mb, "mem-max-allocated-bytes": 20 * mb, "mem-reserved-bytes": 30 * mb,
            "mem-max-reserved-bytes": 40 * mb}
    assert memory_line(3, 10, cuda) == ("[Rank 3] (after 10 iterations) memory (MB) | allocated: 10.0 | "
                                        "max allocated: 20.0 | reserved: 30.0 | max reserved: 40.0")
    assert memory_line(0, 1, {"mem-max-rss-bytes": 512 * mb}) == (
        "[Rank 0] (after 1 iterations) memory (MB) | max RSS (CPU: peak resident set of this process): 512.0")


def test_a_run_that_dies_keeps_its_scalars(tmp_path):
    """The training process raises before closing its sinks: what it logged is on disk."""
    code = ("import sys; from megatron_emu.config import LoggingConfig; from megatron_emu.training.monitor import Sinks; "
            "sinks = Sinks(LoggingConfig(tensorboard_dir=sys.argv[1]), LoggingConfig(), is_writer=True); "
            "[sinks.scalars(it, 8 * it, {'lm loss': 1.0 / it}) for it in (1, 2, 3)]; raise RuntimeError('died')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1 and "RuntimeError: died" in result.stderr
    assert scalars_at(read_events(str(tmp_path)), "lm loss") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}


def test_a_sink_that_cannot_write_is_dropped_and_the_run_goes_on(flags, tmp_path, capsys, caplog, monkeypatch):
    """The disk under --tensorboard-dir fills at the first scalar: one warning naming it, no
    traceback (not even TensorBoard's writer thread's), and the run trains, logs and saves."""
    import errno
    import threading

    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    tb, save = str(tmp_path / "tb"), str(tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="megatron_emu"):
        train.pretrain(parse_args(flags + ["--tensorboard-dir", tb, "--save", save, "--save-interval", "2"]))
    warnings = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert warnings == [f"--tensorboard-dir {tb}: cannot write (OSError: [Errno 28] No space left on device); "
                        "no more scalars go there, the run goes on"]
    assert sorted(log_lines(capsys.readouterr().out)) == [1, 2] and os.path.isdir(os.path.join(save, "iter_0000002"))

    class _AsyncWriterThread(threading.Thread):  # what TensorBoard's writer thread is called
        def run(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    printed = []
    monkeypatch.setattr("sys.stderr", type("Err", (), {"write": lambda self, s: printed.append(s), "flush": lambda self: None})())
    thread = _AsyncWriterThread()
    thread.start()
    thread.join()
    assert printed == []  # raised again at the next add_scalar, where the sink is dropped with one line
