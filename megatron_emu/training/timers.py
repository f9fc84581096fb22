"""Megatron-style per-phase timers, their report over ranks, and the straggler report.

`--timing-log-level` picks which timers run: a timer whose level is above it is a no-op
(no clock, no CUDA synchronisation, no barrier), so level 0 adds nothing to the step.
Level-1 timers start after a barrier (Megatron's --barrier-with-L1-time): a rank that
waits for a slower one waits outside the timed phase, so each rank's times are its own
work and a slow data path shows up as data-loader wait on the slow rank, not as
forward-backward on the others. On CUDA an active timer synchronises the device at
start and stop, so kernels are counted in the phase that launched them.

Times are cumulative per rank; a report gathers them once (one all_gather of a vector
over every rank) and each consumer (the timer lines, the straggler report) takes the
difference since its own last look.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules

# Every timer, in report order, with the lowest --timing-log-level that runs it.
TIMER_LEVELS = {
    "data-loader-wait": 1,  # next(loader): waiting for the DataLoader workers
    "batch-generator": 2,  # the micro-batches moved to the device
    "forward-backward": 1,  # every micro-batch's forward and backward (pipeline schedule included)
    "pipeline-p2p-wait": 2,  # inside forward-backward: waits on pipeline sends / receives
    "grads-reduce": 1,  # partial gradients reduced over TP / PP (DP reduction overlaps backward)
    "optimizer": 1,  # unscale, clip, step
    "optimizer-clip-main-grad": 2,  # inside optimizer: the global grad norm and clipping
    "validation": 1,
    "save-checkpoint": 1,
}
# A rank's step time, for the straggler report: its share of one iteration's work.
STEP_PHASES = ("data-loader-wait", "forward-backward", "grads-reduce", "optimizer")


class _NullTimer(contextlib.nullcontext):
    """A timer above --timing-log-level: entering and leaving it does nothing."""


NULL_TIMER = _NullTimer()


class Timer:
    """Cumulative wall time of one phase on this rank (a context manager)."""

    def __init__(self, name: str, sync_cuda: bool, barrier: bool):
        self.name, self.sync_cuda, self.barrier = name, sync_cuda, barrier
        self.total = 0.0
        self._started: float | None = None

    def __enter__(self) -> "Timer":
        if self.barrier:
            dist.barrier()
        if self.sync_cuda:
            torch.cuda.synchronize()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._started
        self._started = None


class Timers:
    """`timers(name)` -> the phase's Timer, or a no-op when its level is above `level`."""

    def __init__(self, level: int, device: torch.device, barrier_with_l1: bool = True):
        self.level = level
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device  # where gathered tensors live (NCCL gathers device tensors only)
        self._sync_cuda = device.type == "cuda"
        self._barrier = barrier_with_l1 and self.distributed
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str):
        level = TIMER_LEVELS[name]
        if level > self.level:
            return NULL_TIMER
        if name not in self._timers:
            self._timers[name] = Timer(name, self._sync_cuda, self._barrier and level == 1)
        return self._timers[name]

    @property
    def active(self) -> list[str]:
        return [name for name, level in TIMER_LEVELS.items() if level <= self.level]

    def gather(self) -> torch.Tensor:
        """(world, timers) cumulative ms on every rank, -1 where a rank never ran the phase.
        A collective: every rank calls it at the same iteration."""
        names = self.active
        mine = torch.tensor([self._timers[n].total * 1000 if n in self._timers else -1.0 for n in names],
                            dtype=torch.float64, device=self.device)
        if not self.distributed:
            return mine[None].cpu()
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu()

    @contextlib.contextmanager
    def pipeline_waits(self):
        """Time the pipeline schedule's P2P waits (torch.distributed.pipelining calls its
        module-level `_wait_batch_p2p` for every send / receive it waits on)."""
        timer = self("pipeline-p2p-wait")
        if timer is NULL_TIMER:
            yield
            return
        original = schedules._wait_batch_p2p

        def timed_wait(work):
            with timer:
                return original(work)

        schedules._wait_batch_p2p = timed_wait
        try:
            yield
        finally:
            schedules._wait_batch_p2p = original


class Interval:
    """Per-iteration times since this consumer's last look at the gathered totals."""

    def __init__(self, start_iteration: int = 0):
        self._last: torch.Tensor | None = None
        self._last_iteration = start_iteration

    def take(self, totals: torch.Tensor, iteration: int) -> torch.Tensor:
        previous = self._last if self._last is not None else torch.zeros_like(totals)
        steps = max(iteration - self._last_iteration, 1)
        delta = torch.where(totals < 0, torch.full_like(totals, -1.0), (totals - previous.clamp(min=0)) / steps)
        self._last, self._last_iteration = totals.clone(), iteration
        return delta


def format_timers(names: list[str], per_iteration: torch.Tensor, level: int) -> str:
    """Megatron's timer block: (min, max) over ranks at level 1, every rank at level 2.
    A phase no rank ran in this interval (validation, checkpoint save) is left out."""
    ran = [j for j in range(len(names)) if (per_iteration[:, j] > 0).any()]
    if level == 1:
        lines = ["(min, max) time across ranks (ms):"]
        for j in ran:
            times = per_iteration[:, j][per_iteration[:, j] >= 0]
            lines.append(f"    {(names[j] + ' ').ljust(48, '.')}: ({times.min():.2f}, {times.max():.2f})")
        return "\n".join(lines)
    lines = ["times across ranks (ms):"]
    for j in ran:
        lines.append(f"    {names[j]}:")
        lines += [f"     rank {r:2d}: {per_iteration[r, j]:.2f}" for r in range(per_iteration.shape[0])
                  if per_iteration[r, j] >= 0]
    return "\n".join(lines)


def hostnames() -> list[str]:
    """Every rank's hostname (a collective)."""
    mine = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, mine)
    return names


def straggler_report(names: list[str], per_iteration: torch.Tensor, hosts: list[str], threshold: float,
                     first: int, last: int) -> str:
    """The ranks whose step time (the sum of their timed step phases) is more than
    `threshold` percent above the median, with where their time went."""
    columns = [names.index(p) for p in STEP_PHASES]
    step = per_iteration[:, columns].clamp(min=0).sum(dim=1)  # (world,)
    median = statistics.median(step.tolist())
    head = (f"straggler report (iterations {first}-{last}, step time = sum of timed phases, "
            f"threshold +{threshold:g}%): median {median:.1f} ms |")
    slow = [r for r in range(len(step)) if step[r] > median * (1 + threshold / 100)]
    if not slow:
        return f"{head} no straggler"
    parts = []
    for r in sorted(slow, key=lambda r: -step[r]):
        phases = ", ".join(f"{p} {per_iteration[r, names.index(p)].clamp(min=0):.1f} ms" for p in STEP_PHASES)
        parts.append(f"rank {r} ({hosts[r]}): {step[r]:.1f} ms (+{(step[r] / median - 1) * 100:.1f}%): {phases}")
    return f"{head} " + " | ".join(parts)
