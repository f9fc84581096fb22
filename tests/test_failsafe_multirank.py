"""Fail-safe behaviour across ranks: every rank skips the same NaN step (DP2, and PP2 where
only the last stage sees the loss); SIGTERM mid-run saves on every rank, exits 0 and resumes
with the uninterrupted run's losses; a rank that stops answering fails the others within
--distributed-timeout-minutes, naming the collective."""

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_emu.arguments import parse_args
from megatron_emu.training import step
from megatron_emu.training.checkpoint_files import read_latest
from megatron_emu.training.train import pretrain
from tests.dist_utils import spawn
from tests.failsafe_faults import FLAGS
from tests.test_failsafe import saved_tensors

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = FLAGS + ["--global-batch-size", "4"]


class _Patch:
    @staticmethod
    def setattr(obj, name, value):
        setattr(obj, name, value)


def _nan_step_worker(rank: int, world_size: int, flags: list[str], nan_rank: int, calls_per_step: int) -> None:
    from tests.failsafe_faults import nan_loss_at

    torch.set_num_threads(1)
    if rank == nan_rank:
        nan_loss_at(_Patch, {2}, calls_per_step)
    history = pretrain(parse_args(flags)).history
    assert [math.isnan(lm) for _, lm, _ in history] == [False, True, False], (rank, history)


@pytest.mark.parametrize("layout, nan_rank, calls_per_step", [
    (["--data-parallel-sharding", "ddp"], 1, 1),  # NaN on one DP rank only
    (["--pipeline-model-parallel-size", "2"], 1, 2),  # only the last stage (rank 1) computes the loss
], ids=["DP2", "PP2"])
def test_every_rank_skips_the_same_nan_step(tmp_path, layout, nan_rank, calls_per_step):
    save = str(tmp_path / "ckpt")
    flags = TWO_RANKS + layout + ["--train-iters", "3", "--save", save, "--save-interval", "1"]
    spawn(2, _nan_step_worker, flags, nan_rank, calls_per_step)
    before, after = saved_tensors(save, 1, tmp_path), saved_tensors(save, 2, tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no rank updated anything
    assert not all(torch.equal(before[k], saved_tensors(save, 3, tmp_path)[k]) for k in before)  # step 3 trained


# -- torchrun -------------------------------------------------------------------------
def torchrun(*args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(output: str) -> dict[int, tuple[str, str]]:
    """iteration -> (lm, l2) as logged (7 significant digits)."""
    found = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: (\S+) \| l2 loss: (\S+) \|", output)
    return {int(i): (lm, l2) for i, lm, l2 in found}


def workers_of(launcher: int) -> list[int]:
    """torchrun's worker processes: its children (they run in sessions of their own)."""
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher:
            children.append(int(pid))
    return children


def test_sigterm_mid_run_saves_exits_0_and_resumes_exactly(tmp_path):
    save = str(tmp_path / "ckpt")
    run = ["pretrain_emu.py", *TWO_RANKS, "--train-iters", "8", "--save", save, "--load", save, "--exit-signal-handler"]
    first = torchrun(*run)
    output = []
    for line in first.stdout:
        output.append(line)
        if re.search(r"iteration\s+3/", line):
            for pid in workers_of(first.pid):
                os.kill(pid, signal.SIGTERM)
            break
    output += first.stdout.readlines()
    assert first.wait(timeout=300) == 0, "".join(output)
    stopped = read_latest(save)
    assert 3 <= stopped < 8 and "stopping at iteration" in "".join(output)

    resumed = torchrun(*run)
    resumed_output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_output
    reference = torchrun(*run[:-5])  # no --save / --load / handler: uninterrupted
    reference_output = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, reference_output
    interrupted = {**losses("".join(output)), **losses(resumed_output)}
    assert min(losses(resumed_output)) == stopped + 1
    assert interrupted == losses(reference_output) and len(interrupted) == 8


def test_a_silent_rank_fails_the_others_naming_the_collective(tmp_path):
    run = torchrun("tests/failsafe_faults.py", *TWO_RANKS, "--train-iters", "4", "--distributed-timeout-minutes", "0.05",
                   env={"FAULT_SILENT_RANK": "1", "FAULT_AT_STEP": "2"})
    output = run.communicate(timeout=300)[0]  # does not hang: rank 1 sleeps 600 s
    assert run.returncode != 0
    # The first collective of step 2 that rank 1 skips: the grad-norm reduce, or, on a loaded
    # machine, one rank 0 reaches before it (the step's stats): each names its own.
    assert re.search(r"error: rank 0: all_reduce \(called from megatron_emu/[\w/]+\.py:\d+ in \w+\) "
                     r"got no answer within --distributed-timeout-minutes 0.05", output), output


def _mesh_timeout_worker(rank: int, world_size: int) -> None:
    from datetime import timedelta
    import time

    from megatron_emu.config import ParallelConfig, get_preset
    from megatron_emu.parallel.mesh import ParallelDims, build_mesh

    layout = ParallelConfig(data_parallel_sharding="hsdp", num_distributed_optimizer_instances=1)
    pmesh = build_mesh(ParallelDims.from_config(layout, world_size, get_preset("tiny")), torch.device("cpu"),
                       timedelta(seconds=2))
    groups = [pmesh.dp_mesh.get_group(), pmesh.sharding_mesh()["dp_shard"].get_group(), pmesh.new_gloo_group()]
    for group in groups:
        if rank == 1:
            time.sleep(4)  # silent for longer than the groups' 2 s (torch's default: 30 minutes)
        with pytest.raises(RuntimeError):  # rank 0: timed out; rank 1: its peer has given up
            dist.all_reduce(torch.ones(1), group=group)


def test_every_group_gets_the_distributed_timeout():
    spawn(2, _mesh_timeout_worker)
