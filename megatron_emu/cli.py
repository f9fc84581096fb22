"""What the entry points and tools print around their work. No torch import here: `--help`
and usage errors answer before torch loads (it costs seconds).

- `setup_logging`: setup lines and warnings come from rank 0 only (every rank has the same
  config, so rank 0's say it for all); the other ranks of a torchrun job log errors only, and
  their `error:` lines come from training/errors.py either way.
  The training log lines and the summary are printed by the logging rank, not through here.
- `ToolParser`: argparse, whose usage errors end with one example to copy (exit code 2).
- `full_disk_as_error`: a full disk (or quota) while a tool writes becomes one ValueError line.
- `end_process_group`: the last call of an entry point that torchrun / srun may launch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys


def launch_rank() -> int:
    """This process's global rank as torchrun (also under srun) sets it; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def setup_logging() -> None:
    level = logging.INFO if launch_rank() == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its dataset loading is chatty


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser that answers a bare or wrong call with its usage, one `error:` line and
    one example line, exit code 2; `--help` shows the example last."""

    def __init__(self, *args, example: str, **kwargs):
        epilog = kwargs.pop("epilog", None)
        super().__init__(*args, epilog=f"{epilog}\n\nexample: {example}" if epilog else f"example: {example}", **kwargs)
        self.example = example

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nexample: {self.example}\n")


def refuse_run_as_tool(module_file: str, flags: str, example: str) -> None:
    """A module of tools/benchmark_throughput.py run on its own: its usage, one `error:` line
    and an example, exit code 2, as every tool answers a call it cannot serve."""
    name = os.path.basename(module_file)
    print(f"usage: python tools/benchmark_throughput.py [flags] {flags}\n"
          f"error: tools/{name} is a part of tools/benchmark_throughput.py: run that\n"
          f"example: {example}", file=sys.stderr)
    sys.exit(2)


def end_process_group() -> None:
    """End this rank's process groups once its work is done, before the interpreter exits.

    Left alive, gloo's worker threads meet the interpreter's teardown and now and then abort
    the process (SIGABRT, "terminate called without an active exception") after every line
    of output was written; torch asks each launched process to call destroy_process_group.
    Only called after success (the entry points exit before it on an error): destroying a
    group while a failed peer is still inside a collective can hang (torchtitan does the same).
    """
    dist = sys.modules.get("torch.distributed")  # a run that never imported torch has no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def full_disk_as_error(output: str, then: str):
    """ENOSPC / EDQUOT inside the block -> ValueError "<output>: No space left on device; <then>"
    (the tools print a ValueError as one `error:` line); any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ValueError(f"{output}: {e.strerror or os.strerror(e.errno)}; {then}") from None
