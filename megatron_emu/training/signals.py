"""When a run stops on purpose: preemption signals and time limits (Megatron's flags).

    --exit-signal-handler     SIGTERM, or --exit-signal (SLURM's `--signal=B:USR1@120`)
    --exit-duration-in-mins   wall time since the run started
    --exit-interval           the first iteration divisible by N

Each stops the loop after the current step; the caller saves a checkpoint on every rank
and exits 0, so a requeued job resumes from --load = --save. A signal reaches the ranks
at different steps and clocks differ, so those two flags are agreed on by one all-reduce
per step (only when either is enabled); the interval is the same on every rank as is.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

from megatron_emu.config import FailsafeConfig

log = logging.getLogger("megatron_emu")


class ExitConditions:
    """`reason(iteration)` after each step: why the run should stop now, or None."""

    def __init__(self, config: FailsafeConfig, group=None, start_time: float | None = None):
        self.config = config
        self.group = group  # a gloo group: the flags are CPU tensors, whatever the training backend
        self.start_time = time.time() if start_time is None else start_time
        self.received: int | None = None
        self.distributed = dist.is_available() and dist.is_initialized()
        if config.exit_signal_handler:
            for signum in {signal.SIGTERM, getattr(signal, config.exit_signal)}:
                signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            log.warning("received %s: finishing this step, then saving and exiting", signal.Signals(signum).name)
        self.received = signum

    def _local_flags(self) -> list[bool]:
        minutes = (time.time() - self.start_time) / 60
        limit = self.config.exit_duration_in_mins
        return [self.received is not None, limit is not None and minutes >= limit]

    def reason(self, iteration: int) -> str | None:
        c = self.config
        flags = [False, False]
        if c.exit_signal_handler or c.exit_duration_in_mins is not None:
            flags = self._local_flags()
            if self.distributed:  # any rank's signal or clock stops every rank
                agreed = torch.tensor(flags, dtype=torch.int32)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
                flags = [bool(v) for v in agreed]
        if flags[0]:
            return "exit signal received (--exit-signal-handler)"
        if flags[1]:
            return f"--exit-duration-in-mins {c.exit_duration_in_mins} reached"
        if c.exit_interval and iteration % c.exit_interval == 0:
            return f"--exit-interval {c.exit_interval} reached"
        return None
