"""Spawn a gloo process group on CPU for multi-rank tests: one spawn runs many checks.

Workers report failures by raising; torch.multiprocessing.spawn re-raises the first
one in the parent with the worker's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, call_file: str) -> None:
    fn, args = torch.load(call_file, weights_only=False)
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


# Imported once by the fork server; every rank is then forked from it with them loaded.
PRELOAD = ["torch", "torch.distributed", "tests.dist_utils", "megatron_emu.training.train"]


def spawn(world_size: int, fn, *args) -> None:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; fn and args must pickle.

    The ranks are forked from a fork server: a fresh interpreter that imported torch and
    our training code once (importing them per rank costs several seconds on a busy 2-core
    CI machine). Not forked from pytest itself: by the time a multi-rank test runs, this
    process has run hundreds of tests (thread pools, gloo groups, TensorBoard threads), and
    a rank forked from that state once died of heap corruption inside a collective.
    """
    mp.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        call_file = os.path.join(tmp, "call.pt")  # fn and args by file: tensors passed as fds run out of fds
        torch.save((fn, args), call_file)
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "init"), call_file), nprocs=world_size,
                           join=True, start_method="forkserver")


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
