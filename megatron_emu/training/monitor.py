"""Where a run's scalars go besides the log line: TensorBoard and Weights & Biases.

One writer rank owns the sinks (Megatron: the last pipeline stage's first TP rank of DP
rank 0, which holds the loss); on every other rank `Sinks` writes nothing. Scalars go in
under Megatron's tag names, each against the iteration and, as "<tag> vs samples",
against consumed samples, so runs with different batch sizes compare. The run's config
goes in once as text (TensorBoard) and as the run config (W&B).

A sink that fails to write (its disk full, W&B's service gone) is dropped with one warning
and the run goes on: days of training are not ended, or left unsaved, for a lost plot. The
log line still carries every scalar.

Also here: Megatron's memory line, from CUDA's allocator on GPU and from the process's
peak resident set on CPU (torch keeps no allocator statistics there).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import resource
import sys
import threading

import torch

from megatron_emu.config import LoggingConfig
from megatron_emu.optional import require

log = logging.getLogger("megatron_emu")


def config_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True, default=str)


class Sinks:
    """TensorBoard SummaryWriter and a W&B run on the writer rank; nothing elsewhere."""

    def __init__(self, logging: LoggingConfig, run_config, is_writer: bool):
        # Checked on every rank: a missing package stops the whole job, not just one rank.
        tensorboard = require("torch.utils.tensorboard", "--tensorboard-dir") if logging.tensorboard_dir else None
        wandb = require("wandb", "--wandb-project") if logging.wandb_project else None
        self.tensorboard = self.wandb = None
        if not is_writer:
            return
        text = config_json(run_config)
        if tensorboard is not None:
            quiet_tensorboard_writer_thread()
            self.tensorboard = tensorboard.SummaryWriter(
                logging.tensorboard_dir, max_queue=logging.tensorboard_queue_size)
            # Markdown: indented lines render as a code block in TensorBoard's text tab.
            self.tensorboard.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        if wandb is not None:
            self.wandb = wandb.init(project=logging.wandb_project, name=logging.wandb_exp_name or None,
                                    dir=logging.wandb_save_dir or None, config=json.loads(text))
        atexit.register(self.close)  # a run that dies mid-way still flushes what it logged

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalars(self, iteration: int, consumed_samples: int, values: dict[str, float]) -> None:
        """Each value against the iteration and against consumed samples."""
        if self.tensorboard is not None:
            with self.dropped_on_error("tensorboard", f"--tensorboard-dir {self.tensorboard.log_dir}"):
                for tag, value in values.items():
                    self.tensorboard.add_scalar(tag, value, iteration)
                    self.tensorboard.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb is not None:  # W&B plots any logged key as the x-axis: consumed samples is one
            with self.dropped_on_error("wandb", "W&B"):
                self.wandb.log({**values, "consumed-samples": consumed_samples}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            with self.dropped_on_error("tensorboard", f"--tensorboard-dir {self.tensorboard.log_dir}"):
                self.tensorboard.close()
        if self.wandb is not None:
            with self.dropped_on_error("wandb", "W&B"):
                self.wandb.finish()
        self.tensorboard = self.wandb = None

    @contextlib.contextmanager
    def dropped_on_error(self, sink: str, where: str):
        """An error writing to `sink` drops it (one warning); the run goes on."""
        try:
            yield
        except Exception as e:
            setattr(self, sink, None)
            log.warning("%s: cannot write (%s: %s); no more scalars go there, the run goes on",
                        where, e.__class__.__name__, e)


def quiet_tensorboard_writer_thread() -> None:
    """TensorBoard writes from a thread of its own; a write error there is printed as a traceback
    by threading's hook and raised again at the next add_scalar, where Sinks drops the sink
    with one line. So that thread's OSError is not printed twice. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


# -- memory ----------------------------------------------------------------------------
MB = 1024 * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    """Bytes, under Megatron's TensorBoard tags: CUDA allocator stats, or on CPU the peak
    resident set of this process (ru_maxrss, kilobytes on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return {
            "mem-allocated-bytes": torch.cuda.memory_allocated(device),
            "mem-max-allocated-bytes": torch.cuda.max_memory_allocated(device),
            "mem-reserved-bytes": torch.cuda.memory_reserved(device),
            "mem-max-reserved-bytes": torch.cuda.max_memory_reserved(device),
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem-max-rss-bytes": peak if sys.platform == "darwin" else peak * 1024}


def memory_line(rank: int, iteration: int, stats: dict[str, float]) -> str:
    """Megatron's `[Rank r] (after n iterations) memory (MB) | ...` line."""
    head = f"[Rank {rank}] (after {iteration} iterations) memory (MB)"
    if "mem-allocated-bytes" in stats:
        return (f"{head} | allocated: {stats['mem-allocated-bytes'] / MB:.1f}"
                f" | max allocated: {stats['mem-max-allocated-bytes'] / MB:.1f}"
                f" | reserved: {stats['mem-reserved-bytes'] / MB:.1f}"
                f" | max reserved: {stats['mem-max-reserved-bytes'] / MB:.1f}")
    return f"{head} | max RSS (CPU: peak resident set of this process): {stats['mem-max-rss-bytes'] / MB:.1f}"
