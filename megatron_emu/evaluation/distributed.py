"""Data-parallel evaluation: each DP rank answers a strided share of the samples; the answers
are gathered to every rank and put back in the benchmark's order.

World = DP x TP: the ranks of one TP group hold one sharded model and answer the same
samples (their collectives need them in step); only the first of them writes the cache.
A single process is DP = TP = 1 with no process group.
"""

from __future__ import annotations

import torch.distributed as dist


class DataParallel:
    def __init__(self, rank: int = 0, size: int = 1, tp_rank: int = 0):
        self.rank, self.size, self.tp_rank = rank, size, tp_rank

    @classmethod
    def from_mesh(cls, mesh) -> "DataParallel":
        if mesh is None:
            return cls()
        return cls(mesh.get_local_rank("dp"), mesh.size(0), mesh.get_local_rank("tp"))

    @property
    def writes(self) -> bool:
        """This rank writes its share's cache: one per DP rank, the first of its TP group."""
        return self.tp_rank == 0

    @property
    def first(self) -> bool:
        """The one rank that writes what all ranks share (results, table, RICES features)."""
        return self.rank == 0 and self.tp_rank == 0

    def shard_indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.size))

    def shard(self, items: list) -> list:
        return [items[i] for i in self.shard_indices(len(items))]

    def gather(self, mine: dict) -> dict:
        """Every rank's {key: value}, merged on every rank (TP peers send the same keys)."""
        if not dist.is_initialized():
            return dict(mine)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        merged = {}
        for part in everyone:
            merged.update(part)
        return merged

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
