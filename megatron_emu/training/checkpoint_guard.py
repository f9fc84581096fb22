"""What a checkpoint save cannot rely on: a device with room, a process that is not killed.

Recognising a full device behind the error DCP or torch's zip writer raises, and sweeping
what a killed save leaves behind, so that the next save starts clean.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

from megatron_emu.training.checkpoint_files import LATEST_NAME

_TMP_DIR_RE = re.compile(r"^iter_\d{7,}\.tmp$")


def sweep_interrupted_saves(root: str) -> None:
    """Remove what a killed save leaves: `iter_N.tmp` dirs and `latest`'s `.tmp.<pid>` files."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if _TMP_DIR_RE.match(name):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(LATEST_NAME + ".tmp."):
            os.remove(path)


def _causes(e: BaseException):
    """e, what caused it, and (DCP's CheckpointException) every rank's failure."""
    seen = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():  # (exception, stack summary) per rank
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def disk_full(e: BaseException, root: str) -> bool:
    """ENOSPC anywhere in the chain; or an error that hides it (torch's zip writer says only
    "unexpected pos") while the device has (almost) nothing left."""
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC or "No space left" in str(c) for c in _causes(e)):
        return True
    try:
        return shutil.disk_usage(root).free < 2**20
    except OSError:
        return False


def no_checkpoint_message(root: str, own_save: bool) -> str:
    if not os.path.exists(root):
        where = f"--load {root}: no such directory"
    elif own_save:
        where = f"--load {root} holds iteration directories but no {LATEST_NAME}"
    else:
        where = f"--load {root} holds no checkpoint (no {LATEST_NAME})"
    return (f"{where}; only the run's own, still empty --save may start from scratch (leave out --load, "
            f"or give an iteration directory)")
