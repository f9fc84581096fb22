"""Flags of a run's sinks and timers (Megatron-LM's names) -> LoggingConfig.

Shared by pretrain_emu.py (add_logging_args: sinks, timers, straggler report) and
finetune_decoder.py (add_sink_args: TensorBoard and W&B only).
"""

import argparse

from megatron_emu.config import LoggingConfig
from megatron_emu.optional import require


def add_sink_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """TensorBoard and W&B flags (pretrain_emu.py and finetune_decoder.py)."""
    g = parser.add_argument_group("logging", "TensorBoard, Weights & Biases, timers (training/monitor.py)")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard events here (one writer rank)")
    g.add_argument("--tensorboard-log-interval", type=int, default=None, help="iterations between per-step scalars")
    g.add_argument("--tensorboard-queue-size", type=int, default=None, help="events buffered before a flush")
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases (WANDB_MODE=offline: no network)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run name")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B writes its run directory")
    return g


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """The sinks, plus what pretraining writes to them, its timers and straggler report."""
    g = add_sink_args(parser)
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true", default=None,
                   help="also the validation perplexity")
    g.add_argument("--log-timers-to-tensorboard", action="store_true", default=None,
                   help="per-phase timers (max over ranks)")
    g.add_argument("--log-memory-to-tensorboard", action="store_true", default=None,
                   help="memory: CUDA allocator stats on GPU, the process's peak RSS on CPU")
    g.add_argument("--timing-log-level", type=int, default=None, choices=[0, 1, 2],
                   help="0: no per-phase timers; 1: min/max over ranks; 2: every rank's times")
    g.add_argument("--no-barrier-with-level-1-timing", dest="barrier_with_l1_time", action="store_false",
                   default=None,
                   help="no barrier before timed phases (their times then include waiting for other ranks)")
    g.add_argument("--log-straggler", action="store_true", default=None,
                   help="report ranks whose step time is above the median by --straggler-threshold percent")
    g.add_argument("--straggler-threshold", type=float, default=None, help="percent above the median step time")
    g.add_argument("--straggler-interval", type=int, default=None,
                   help="iterations between straggler reports (default: --log-interval)")


SINK_FIELDS = ("tensorboard_dir", "tensorboard_log_interval", "tensorboard_queue_size", "wandb_project",
               "wandb_exp_name", "wandb_save_dir")
LOGGING_FIELDS = SINK_FIELDS + (
    "log_validation_ppl_to_tensorboard", "log_timers_to_tensorboard", "log_memory_to_tensorboard", "timing_log_level",
    "barrier_with_l1_time", "log_straggler", "straggler_threshold", "straggler_interval")


def given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The flags among `names` given on the command line (flags default to None: LoggingConfig's
    defaults are the only ones)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def sink_config(args: argparse.Namespace) -> LoggingConfig:
    """The TensorBoard / W&B part of LoggingConfig (all finetune_decoder.py has)."""
    # A missing sink package stops the run now, not after the model is built.
    if args.tensorboard_dir:
        require("torch.utils.tensorboard", "--tensorboard-dir")
    if args.wandb_project:
        require("wandb", "--wandb-project")
    return LoggingConfig(**given(args, SINK_FIELDS))


def logging_config(args: argparse.Namespace) -> LoggingConfig:
    sink_config(args)  # the sinks' packages are there
    return LoggingConfig(**given(args, LOGGING_FIELDS))
