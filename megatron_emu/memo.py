"""`cached`: memoise a function of model configs, which are mutable dataclasses (not hashable)."""

from __future__ import annotations

import functools


def cached(fn):
    """Memoise on the arguments' repr (configs are mutable dataclasses, not hashable)."""
    cache: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args):
        key = repr(args)
        if key not in cache:
            cache[key] = fn(*args)
        return cache[key]

    return wrapper
