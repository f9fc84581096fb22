"""Optional packages (the extras in setup.py): import one, or stop with one line naming the flag.

Light on purpose (no torch): the flag parsers call it, before anything heavy is imported.
"""

from __future__ import annotations

import importlib


def require(package: str, flag: str):
    """Import an optional package, or stop with one line naming the flag that needs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        name = package.split(".")[-1]  # torch.utils.tensorboard needs the tensorboard package
        raise SystemExit(f"{flag} needs the {name} package: pip install {name} "
                         f"(or pip install 'megatron_emu[monitor]')") from None
