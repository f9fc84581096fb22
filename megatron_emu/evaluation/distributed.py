"""Data-parallel evaluation: each DP rank answers a strided share of the samples; the answers
are gathered to every rank and put back in the benchmark's order.

World = DP x TP x PP: the ranks of one TP x PP group hold one model (sharded, split into
pipeline stages) and answer the same samples (their collectives and stage-to-stage sends
need them in step); only the first of them writes the cache. A single process is
DP = TP = PP = 1 (a one-rank process group, or none).
"""

from __future__ import annotations

import torch.distributed as dist


class DataParallel:
    def __init__(self, rank: int = 0, size: int = 1, tp_rank: int = 0, pp_rank: int = 0):
        self.rank, self.size, self.tp_rank, self.pp_rank = rank, size, tp_rank, pp_rank

    @classmethod
    def from_mesh(cls, pmesh) -> "DataParallel":
        """From an inference run's ParallelMesh (parallel/mesh.py); None: one process alone."""
        if pmesh is None:
            return cls()
        return cls(pmesh.dp_rank, pmesh.dims.dp, pmesh.tp_rank, pmesh.pp_rank)

    @property
    def writes(self) -> bool:
        """This rank writes its share's cache: one per DP rank, the first of its TP x PP group."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def first(self) -> bool:
        """The one rank that writes what all ranks share (results, table, RICES features)."""
        return self.rank == 0 and self.writes

    def shard_indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.size))

    def shard(self, items: list) -> list:
        return [items[i] for i in self.shard_indices(len(items))]

    def gather(self, mine: dict) -> dict:
        """Every rank's {key: value}, merged on every rank (TP / PP peers send the same keys)."""
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
