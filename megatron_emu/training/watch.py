"""What the pretraining loop reports besides its log line: scalars to the sinks, the
timer block, the straggler report and the memory line (monitor.py, timers.py).

Collectives happen only when a flag asks: the timer gather at --timing-log-level >= 1
(log iterations), the straggler gather every --straggler-interval, the loader counters'
sum over data-parallel ranks when a sink is on. With none of the flags, nothing here
touches the process group.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_emu.config import TrainConfig
from megatron_emu.parallel.mesh import ParallelMesh
from megatron_emu.training.metrics import IterationStats, device_peak_tflops
from megatron_emu.training.monitor import Sinks, memory_line, memory_stats
from megatron_emu.training.optim import family_lrs, lr_factor
from megatron_emu.training.step import StepResult
from megatron_emu.training.timers import Interval, Timers, format_timers, hostnames, straggler_report

log = logging.getLogger("megatron_emu")

# IterationStats fields written every --tensorboard-log-interval by `step` (lm / l2 loss,
# learning rate, grad norm, batch size, consumed samples) are left out at the log line;
# the rest go in under Megatron's tags, and fields added later (e.g. skipped or NaN
# iteration counters) under their own name with spaces.
STATS_TAGS = {"elapsed_ms": "iteration-time", "tokens_per_s": "tokens-per-sec", "tflops_per_device": "tflops-per-device"}
NOT_SCALARS = ("iteration", "train_iters", "lm_loss", "l2_loss", "lr", "global_batch_size", "grad_norm",
               "consumed_samples")
FAMILY_NAMES = {"llm": "LLaMA", "vision": "EVA-CLIP", "causal_former": "Causal Former"}


def is_writer_rank(pmesh: ParallelMesh) -> bool:
    """Megatron's TensorBoard rank: last pipeline stage, first TP rank, DP rank 0."""
    return pmesh.pp_rank == pmesh.dims.pp - 1 and pmesh.tp_rank == 0 and pmesh.dp_rank == 0


def stats_scalars(stats: IterationStats) -> dict[str, float]:
    """The log line's numbers that only exist at log iterations (iteration-time in seconds, as Megatron)."""
    values = {}
    for name, value in vars(stats).items():
        if name in NOT_SCALARS or not isinstance(value, (int, float)):
            continue
        values[STATS_TAGS.get(name, name.replace("_", " "))] = value / 1000 if name == "elapsed_ms" else value
    return values


class TrainingMonitor:
    """Owns the timers and sinks of one pretraining run; every rank builds one."""

    def __init__(self, config: TrainConfig, pmesh: ParallelMesh, device: torch.device, is_logger: bool,
                 start_iteration: int = 0):
        self.config, self.logging, self.pmesh, self.device = config, config.logging, pmesh, device
        self.is_logger = is_logger  # prints the timer and straggler blocks
        self.timers = Timers(self.logging.timing_log_level, device, self.logging.barrier_with_l1_time)
        self.sinks = Sinks(self.logging, config, is_writer_rank(pmesh))
        self.hosts = hostnames() if self.logging.log_straggler else []
        self._timer_interval, self._straggler_interval = Interval(start_iteration), Interval(start_iteration)
        self._straggler_from = start_iteration + 1
        self._memory_reported = False
        # Before the loop: on CPU the peak is a measured matmul, which must not land in a timed iteration.
        self._peak_tflops = self.peak_tflops() if self.sinks.active else 0.0

    # -- per step -----------------------------------------------------------------------
    def step(self, iteration: int, lr: float, result: StepResult, microbatches: list[dict], loader) -> None:
        """Per-step scalars every --tensorboard-log-interval iterations."""
        if not self.logging.has_sink or iteration % self.logging.tensorboard_log_interval:
            return
        consumed = iteration * self.config.data.global_batch_size
        values = {"lm loss": result.lm_loss, "l2 loss": result.l2_loss, "learning-rate": lr,
                  "grad-norm": result.grad_norm, "batch-size": self.config.data.global_batch_size,
                  "consumed-samples": consumed, "images-per-step": result.images}
        values.update(self.family_lrs(iteration - 1))
        values.update(self.loader_counters(result, microbatches, loader))
        self.sinks.scalars(iteration, consumed, values)

    def family_lrs(self, step: int) -> dict[str, float]:
        """Each module group's rate, from the schedule (a pipeline rank's optimizer holds only its
        stages' groups); frozen groups have none."""
        opt = self.config.optimizer
        frozen = {"llm": opt.freeze_llm, "vision": opt.freeze_vision, "causal_former": opt.freeze_causal_former}
        factor = lr_factor(step, opt, self.config.train_iters)
        return {f"learning-rate/{FAMILY_NAMES[f]}": peak * factor for f, peak in family_lrs(opt).items() if not frozen[f]}

    def loader_counters(self, result: StepResult, microbatches: list[dict], loader) -> dict[str, float]:
        """What the sequence builder cut (run totals) and how full the rows were, summed over DP."""
        pad = self.config.model.special_tokens.pad
        real_tokens = sum(int((b["tokens"] != pad).sum()) for b in microbatches)
        counts = torch.tensor([loader.totals["truncated_tokens"], loader.totals["dropped_images"], real_tokens],
                              dtype=torch.float64, device=self.device)
        if self.pmesh.dims.dp > 1:
            dist.all_reduce(counts, group=self.pmesh.dp_mesh.get_group())
        return {"truncated-tokens": counts[0].item(), "dropped-images": counts[1].item(),
                "packing-efficiency": counts[2].item() / (result.sequences * self.config.data.seq_length)}

    # -- per log line ---------------------------------------------------------------------
    def log_line(self, stats: IterationStats) -> None:
        """After the log line: throughput scalars, the timer block, the first memory line."""
        iteration, consumed = stats.iteration, stats.consumed_samples
        if self.sinks.active:
            values = stats_scalars(stats)
            mfu = self.mfu(stats.tflops_per_device)
            if mfu is not None:
                values["mfu"] = mfu
            self.sinks.scalars(iteration, consumed, values)
        if self.timers.level >= 1:
            per_iteration = self._timer_interval.take(self.timers.gather(), iteration)
            if self.is_logger:
                tqdm.write(format_timers(self.timers.active, per_iteration, self.timers.level), file=sys.stdout)
            if self.logging.log_timers_to_tensorboard:
                self.sinks.scalars(iteration, consumed, {
                    f"{name}-time": per_iteration[:, j].max().item()
                    for j, name in enumerate(self.timers.active) if per_iteration[:, j].max() >= 0})
        self.memory(iteration, consumed)

    def peak_tflops(self) -> float:
        """The MFU denominator (0: none known, no MFU scalar)."""
        try:
            peak, source = device_peak_tflops(self.device, getattr(torch, self.config.performance.compute_dtype))
        except ValueError as error:  # a GPU without a known peak
            log.warning("no MFU scalar: %s", error)
            return 0.0
        log.info("MFU denominator: %.2f TFLOP/s per device (%s)", peak, source)
        return peak

    def mfu(self, tflops_per_device: float) -> float | None:
        return tflops_per_device / self._peak_tflops if self._peak_tflops else None

    def memory(self, iteration: int, consumed: int) -> None:
        """Megatron prints the memory line once, after the first logged iterations (DP rank 0)."""
        stats = memory_stats(self.device)
        if not self._memory_reported and self.pmesh.dp_rank == 0:
            tqdm.write(memory_line(self.pmesh.rank, iteration, stats), file=sys.stdout)
        self._memory_reported = True
        if self.logging.log_memory_to_tensorboard:
            self.sinks.scalars(iteration, consumed, stats)

    def validation(self, iteration: int, lm: float, l2: float) -> None:
        consumed = iteration * self.config.data.global_batch_size
        values = {"lm loss validation": lm, "l2 loss validation": l2}
        if self.logging.log_validation_ppl_to_tensorboard:
            values["lm loss validation ppl"] = math.exp(min(lm, 50.0))  # the log line's PPL
        self.sinks.scalars(iteration, consumed, values)

    # -- end of iteration -------------------------------------------------------------------
    def end_of_iteration(self, iteration: int) -> None:
        """Every --straggler-interval iterations: the ranks well above the median step time."""
        if not self.logging.log_straggler:
            return
        every = self.logging.straggler_interval or self.config.log_interval
        if iteration % every:
            return
        per_iteration = self._straggler_interval.take(self.timers.gather(), iteration)
        if self.is_logger:
            tqdm.write(straggler_report(self.timers.active, per_iteration, self.hosts,
                                        self.logging.straggler_threshold, self._straggler_from, iteration),
                       file=sys.stdout)
        self._straggler_from = iteration + 1

    def close(self) -> None:
        self.sinks.close()
