"""Spawn a gloo process group on CPU for multi-rank tests: one spawn runs many checks.

Workers report failures by raising; torch.multiprocessing.spawn re-raises the first
one in the parent with the worker's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the CI machine has 2 cores shared by every rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a test's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world_size: int, fn, *args) -> None:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; fn must be importable.

    Forked where that is safe (Linux, no CUDA and no process group in this process):
    every rank then starts with torch already imported, which otherwise costs several
    seconds per rank on a busy 2-core CI machine.
    """
    safe_to_fork = sys.platform == "linux" and not torch.cuda.is_initialized() and not dist.is_initialized()
    start_method = "fork" if safe_to_fork else "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "init"), fn, args), nprocs=world_size,
                           join=True, start_method=start_method)


# Imported by every Python process started with its folder on PYTHONPATH; its exit hook is
# registered first, so it runs last, after the entry point returned and torch's own hooks.
EXIT_PROBE = r"""
import atexit, os, sys

def _report():
    dist = sys.modules.get("torch.distributed")
    if dist is not None and "RANK" in os.environ:  # the ranks torchrun started, not torchrun
        state = "alive" if dist.is_initialized() else "ended"
        os.write(2, f"process group at exit: {state}\n".encode())  # one write: ranks share torchrun's stderr

atexit.register(_report)
"""


def exit_probe(tmp_path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize reports, at each rank's exit, whether the
    process group was still alive (cli.end_process_group ends it)."""
    folder = tmp_path / "exit_probe"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(EXIT_PROBE)
    return folder
