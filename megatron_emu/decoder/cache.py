"""On-disk caches of what the frozen models compute: Emu conditions and VAE latents.

Both Emu and the VAE are frozen, so a pair's condition (32, H) and its latent
distribution (2C, h, w) never change during finetuning; `--precompute-conditions` /
`--precompute-latents` compute them once per dataset (all ranks share the rows) and the
loop then reads rows instead of running the 14B Emu and the VAE encoder.

Per dataset and kind: `<dir>/<name>.<kind>.npy` (rows in document order, raw 16-bit
values: bf16 for conditions, whose range is the LLM's; fp16 for latent moments) and
`<dir>/<name>.<kind>.json` (what produced it). A cache whose description differs from
the run's (another Emu checkpoint, mode, VAE, resolution, dataset) is refused.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_emu.files import write_json_atomic

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_prefix(cache_dir: str, dataset_prefix: str, kind: str) -> str:
    return os.path.join(cache_dir, f"{os.path.basename(dataset_prefix)}.{kind}")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_cache(prefix: str, meta: dict, num_rows: int, row_shape: tuple[int, ...], dtype: str,
                compute: Callable[[list[int]], torch.Tensor], batch_size: int, rank: int = 0, world: int = 1) -> None:
    """Fill rows 0..num_rows-1 with compute(indices) -> (b, *row_shape); ranks split the rows.

    Skipped when a complete cache with the same description exists. The .json is written
    last (atomically), so an interrupted run leaves no cache that looks complete.
    """
    meta = dict(meta, num_rows=num_rows, row_shape=list(row_shape), dtype=dtype)
    if _existing_meta(prefix) == meta:
        return
    if rank == 0:
        os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
        if os.path.exists(prefix + ".json"):
            os.remove(prefix + ".json")
        np.lib.format.open_memmap(prefix + ".npy", mode="w+", dtype=np.int16, shape=(num_rows, *row_shape)).flush()
    _barrier()
    rows = np.load(prefix + ".npy", mmap_mode="r+")
    mine = list(range(rank, num_rows, world))
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        values = compute(indices).to("cpu", DTYPES[dtype]).contiguous()  # (b, *row_shape)
        rows[indices] = values.view(torch.int16).numpy()
    rows.flush()
    del rows
    _barrier()
    if rank == 0:
        write_json_atomic(prefix + ".json", meta)  # written last: marks the cache complete
    _barrier()


def _existing_meta(prefix: str) -> dict | None:
    try:
        with open(prefix + ".json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class CacheReader:
    """Rows of one complete cache, checked against the run's description."""

    def __init__(self, prefix: str, meta: dict):
        found = _existing_meta(prefix)
        if found is None:
            raise ValueError(f"{prefix}.json: no complete cache here (run with the --precompute flag first)")
        for key, value in meta.items():
            if found.get(key) != value:
                raise ValueError(f"{prefix}.json: cache was made with {key}={found.get(key)!r}, this run has {value!r}")
        self.dtype = DTYPES[found["dtype"]]
        self.rows = np.load(prefix + ".npy", mmap_mode="r")
        if self.rows.shape[0] != found["num_rows"]:
            raise ValueError(f"{prefix}.npy: {self.rows.shape[0]} rows, the description says {found['num_rows']}")

    def read(self, indices: list[int]) -> torch.Tensor:
        raw = torch.from_numpy(np.ascontiguousarray(self.rows[indices]))  # int16 (b, *row_shape)
        return raw.view(self.dtype).float()


class KeyedCaches:
    """(dataset id, document) keys -> rows, one CacheReader per dataset."""

    def __init__(self, readers: list[CacheReader]):
        self.readers = readers

    def read(self, keys: torch.Tensor) -> torch.Tensor:  # keys (B, 2) -> (B, *row_shape)
        rows = [self.readers[int(d)].read([int(i)]) for d, i in keys]
        return torch.cat(rows)
