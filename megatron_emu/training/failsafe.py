"""What keeps a days-long run from destroying its own good work.

- Non-finite steps: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer
  update) and counted; too many in a row stop the run (`SkipTracker`).
- Non-finite state is never saved (`nonfinite_state`, called by the checkpointer).
- `--save` is checked before iteration 1: every writing rank can create files there, and
  rank 0 sees room for one checkpoint (`check_save_dir`).

Every decision here is identical on all ranks: it is made from values that are already
global (the all-reduced loss and gradient norm) or after an explicit all-reduce.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_emu.training.errors import RunStopped  # noqa: F401 (raised here and by checkpoint.py)

log = logging.getLogger("megatron_emu")


# ---------------------------------------------------------------------------
# Skipped steps
# ---------------------------------------------------------------------------
def step_is_finite(lm_loss: float, l2_loss: float, grad_norm: float) -> bool:
    """All three values are global (reduced over every rank), so every rank agrees."""
    return all(math.isfinite(v) for v in (lm_loss, l2_loss, grad_norm))


@dataclass
class SkipTracker:
    """Counts skipped and non-finite steps (Megatron's log counters, per log interval) and
    stops the run after `max_consecutive` skipped steps in a row."""

    max_consecutive: int
    in_a_row: int = 0
    skipped: int = 0  # since the last log line
    nan: int = 0  # since the last log line

    def record(self, iteration: int, skipped: bool, nonfinite: bool) -> None:
        self.skipped += skipped
        self.nan += nonfinite
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            log.warning("iteration %d skipped: %s", iteration,
                        "non-finite loss or gradient norm" if nonfinite else "fp16 gradients overflowed")
        if self.in_a_row >= self.max_consecutive:
            raise RunStopped(
                f"{self.in_a_row} iterations in a row skipped (up to iteration {iteration}): the loss or gradient "
                f"norm is not finite (--max-skipped-iterations {self.max_consecutive}); nothing was saved from them, "
                f"resume from the last checkpoint with a lower --lr or other data"
            )

    def take_counts(self) -> tuple[int, int]:
        """(skipped, nan) since the last call: what one log line reports."""
        counts = self.skipped, self.nan
        self.skipped = self.nan = 0
        return counts


# ---------------------------------------------------------------------------
# Non-finite state before a save
# ---------------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nonfinite_state(state: dict[str, object]) -> list[str]:
    """Names of the floating-point tensors of this rank's share of `state` with a NaN/inf."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(_local(value)).all())]


def agree_count(count: int, group=None) -> int:
    """The sum of `count` over all ranks (no-op single-process), so every rank decides alike."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    total = torch.tensor([count], dtype=torch.int64)  # CPU: `group` is the checkpointer's gloo group
    dist.all_reduce(total, group=group)
    return int(total)


# ---------------------------------------------------------------------------
# --save before iteration 1
# ---------------------------------------------------------------------------
def checkpoint_bytes(parts, optimizer, stage_ranks: int = 1) -> int:
    """This rank's share of one checkpoint: parameters, plus Adam's two moments of each trainable
    parameter. A value held by several ranks (data- or tensor-parallel copies) counts once in
    the sum over ranks, which is the checkpoint's size. `stage_ranks`: ranks of one pipeline
    stage (DP x TP), each of which holds the stage's parameters or a shard of them."""
    total = 0.0
    owners = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for part in parts:
        for p in part.parameters():
            local = _local(p.data)
            size = local.numel() * local.element_size() * (3 if id(p) in owners else 1)
            total += size / _replicas(p, stage_ranks)
    return int(total)


def _replicas(p: torch.Tensor, stage_ranks: int) -> int:
    """How many ranks hold the same values as this rank's share of p."""
    if not isinstance(p, DTensor):
        return stage_ranks  # DDP: every rank of the stage holds all of it
    mesh = p.device_mesh
    count = stage_ranks // mesh.size()  # copies outside the DTensor's mesh (DDP beside TP)
    for dim, placement in enumerate(p.placements):
        if not placement.is_shard():
            count *= mesh.size(dim)
    return count


def check_save_before_training(save: str, parts, optimizer, stage_ranks: int, rank: int, group=None) -> None:
    """Before iteration 1: --save writable on every rank, room for one checkpoint (rank 0)."""
    needed = agree_count(checkpoint_bytes(parts, optimizer, stage_ranks), group)
    check_save_dir(save, needed, rank, group)


def check_save_dir(save: str, needed_bytes: int, rank: int, group=None) -> None:
    """Refuse a --save this rank cannot write, or (rank 0) one without room for a checkpoint.

    A real file is created and removed: permission bits say nothing to root, and a read-only
    mount or a path under a regular file fails only when written. Ranks gather their findings
    so that every rank raises the same error instead of some hanging in the next collective.
    """
    problem = _writable_problem(save, rank)
    if problem is None and rank == 0:
        problem = _space_problem(save, needed_bytes)
    problems = [problem]
    if dist.is_available() and dist.is_initialized():
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    found = [(r, p) for r, p in enumerate(problems) if p]
    if found:
        r, p = found[0]
        raise ValueError(p if len(problems) == 1 else f"rank {r}: {p}")


def _writable_problem(save: str, rank: int) -> str | None:
    probe = os.path.join(save, f".write_test.rank{rank}.{os.getpid()}")
    try:
        os.makedirs(save, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        return f"--save {save} is not writable: {e.strerror or e}"
    return None


def _space_problem(save: str, needed_bytes: int) -> str | None:
    free = shutil.disk_usage(save).free
    if free < needed_bytes:
        return (f"--save {save}: {free / 2**30:.2f} GiB free on its device, but one checkpoint needs about "
                f"{needed_bytes / 2**30:.2f} GiB (parameters + optimizer states): free space or choose another --save")
    return None
