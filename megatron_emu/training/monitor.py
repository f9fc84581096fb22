"""Where a run's scalars go besides the log line: TensorBoard and Weights & Biases.

One writer rank owns the sinks (Megatron: the last pipeline stage's first TP rank of DP
rank 0, which holds the loss); on every other rank `Sinks` writes nothing. Scalars go in
under Megatron's tag names, each against the iteration and, as "<tag> vs samples",
against consumed samples, so runs with different batch sizes compare. The run's config
goes in once as text (TensorBoard) and as the run config (W&B).

Also here: Megatron's memory line, from CUDA's allocator on GPU and from the process's
peak resident set on CPU (torch keeps no allocator statistics there).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import resource
import sys

import torch

from megatron_emu.config import LoggingConfig


def require(package: str, flag: str):
    """Import an optional sink package, or stop with one line naming the flag."""
    try:
        return importlib.import_module(package)
    except ImportError:
        name = package.split(".")[-1]  # torch.utils.tensorboard needs the tensorboard package
        raise SystemExit(f"{flag} needs the {name} package: pip install {name} "
                         f"(or pip install 'megatron_emu[monitor]')") from None


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
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, iteration)
                self.tensorboard.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb is not None:  # W&B plots any logged key as the x-axis: consumed samples is one
            self.wandb.log({**values, "consumed-samples": consumed_samples}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


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
