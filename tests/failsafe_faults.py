"""Faults the fail-safe tests inject: a NaN loss at chosen steps, a silent rank, a full disk.

Also the torchrun entry of the multi-process tests: `python -m tests.failsafe_faults ARGS`
runs pretrain_emu.main(ARGS) after injecting what the FAULT_* environment variables say.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from megatron_emu.model.loss import EmuLoss
from megatron_emu.training import step

FLAGS = ["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "80",
         "--num-workers", "0", "--lr-warmup-iters", "1", "--log-interval", "1", "--device", "cpu",
         "--split", "1,0,0", "--eval-interval", "0"]


def nan_loss_at(monkeypatch, steps: set[int], calls_per_step: int = 1) -> None:
    """The training loss is NaN at these steps (1-based); its gradients follow."""
    real, calls = step.mixed_loss, [0]

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if (calls[0] - 1) // calls_per_step + 1 in steps:
            nan = torch.tensor(float("nan"))
            return EmuLoss(out.total * nan, out.lm * nan, out.l2 * nan)
        return out

    monkeypatch.setattr(step, "mixed_loss", loss)


def disk_full_after(monkeypatch, items: int) -> None:
    """DCP's writer fills the device: `items` items are written, then part of one, then ENOSPC."""
    real, written = dcp_filesystem._write_item, [0]

    def write_item(transforms, stream, *args, **kwargs):
        if written[0] >= items:
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += 1
        return real(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def silent_rank(rank: int, at_step: int) -> None:
    """This rank stops answering at `at_step`: it sleeps before the step's loss all-reduce."""
    real, calls = step.reduce_step_stats, [0]

    def reduce(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_step and int(os.environ["RANK"]) == rank:
            time.sleep(600)
        return real(*args, **kwargs)

    step.reduce_step_stats = reduce


if __name__ == "__main__":
    if "FAULT_SILENT_RANK" in os.environ:
        silent_rank(int(os.environ["FAULT_SILENT_RANK"]), int(os.environ["FAULT_AT_STEP"]))
    import pretrain_emu

    pretrain_emu.main(sys.argv[1:])
