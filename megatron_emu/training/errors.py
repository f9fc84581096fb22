"""How an entry point ends on an error: one line on stderr and an exit code, no traceback.

    exit 2  bad input: a flag, a file, a dataset, a checkpoint (ValueError)
    exit 1  the run cannot go on: too many skipped steps, non-finite state, a full disk,
            a rank that stopped answering (named with the collective that waited for it)

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
import traceback

# No torch import here: the entry points parse flags (and answer --help) before torch loads.
# torch's modules are looked up in sys.modules: an error cannot come from one not imported.

USER_ERROR, RUN_ERROR = 2, 1


class RunStopped(RuntimeError):
    """The run cannot go on (too many skipped steps, non-finite state): exit non-zero."""


def _rank_prefix() -> str:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"rank {dist.get_rank()}: "
    return ""


def _checkpoint_failures(e: BaseException) -> list | None:
    """DCP gathers each rank's failure into one CheckpointException: its failures, else None."""
    dcp_api = sys.modules.get("torch.distributed.checkpoint.api")
    if dcp_api is None or not isinstance(e, dcp_api.CheckpointException):
        return None
    return [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]


def _is_timeout(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and ("Timed out" in text or "timed out" in text or "Connection closed by peer" in text)


def collective_site(e: BaseException) -> str:
    """The collective that waited (innermost torch.distributed call) and our code that made it."""
    frames = traceback.extract_tb(e.__traceback__)
    collective = next((f.name for f in reversed(frames) if f.filename.endswith("distributed_c10d.py")), None)
    ours = next((f for f in reversed(frames) if "megatron_emu" in f.filename), None)
    if collective is None:  # inside autograd / DCP: name the torch function that ran it
        inner = next((f for f in reversed(frames) if "torch" in f.filename), None)
        collective = f"a collective inside {inner.name}" if inner else "a collective"
    if ours is None:
        return collective
    where = ours.filename[ours.filename.rindex("megatron_emu"):]
    return f"{collective} (called from {where}:{ours.lineno} in {ours.name})"


def describe(e: BaseException, timeout_minutes: float | None = None) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can act on; None for a bug."""
    failures = _checkpoint_failures(e)
    if failures is not None:  # describe the first rank's failure
        return describe(failures[0], timeout_minutes) if failures else None
    if isinstance(e, RunStopped):
        return str(e), RUN_ERROR
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return e.strerror or str(e), RUN_ERROR
    if isinstance(e, ValueError):
        return str(e), USER_ERROR
    if _is_timeout(e):
        limit = f" within --distributed-timeout-minutes {timeout_minutes:g}" if timeout_minutes is not None else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"{collective_site(e)} got no answer{limit}: another rank stopped answering or died "
                f"(its log says why) [{first}]"), RUN_ERROR
    return None


def exit_on_error(run, timeout_minutes: float | None = None):
    """run() and return its result; an error users can act on becomes one line and an exit code."""
    try:
        return run()
    except BaseException as e:  # CheckpointException is a BaseException; the rest re-raise below
        found = describe(e, timeout_minutes)
        if found is None:
            raise
        message, code = found
        print(f"error: {_rank_prefix()}{message}", file=sys.stderr, flush=True)
        sys.exit(code)
