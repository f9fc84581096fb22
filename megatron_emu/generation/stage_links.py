"""Pipeline-parallel inference: how one rank's stage talks to its neighbours while decoding.

Decoding is one sequence of small forward passes (the prompt, then one token per step), so
inference needs no schedule: per pass, stage i runs its LLaMA layers on what stage i-1 sent
(with its own KV cache: the cache holds the keys and values of the layers of this rank)
and sends the hidden states on; the last stage computes the next-token logits and
broadcasts them to every stage, so every rank runs the same decoding loop (greedy, sampling
with the same seed, beam search) and picks the same tokens. Broadcasting the logits, not
the token, keeps every decoding strategy unchanged: (B, V) floats per step, less than the
hidden states a stage sends for a whole prompt.

The links join the ranks of one pipeline (the "pp" dimension at this rank's dp and tp
coordinates); under tensor parallelism each TP rank of stage i sends to the same TP rank of
stage i+1 the replicated hidden states of its stage (no sequence parallelism at inference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


class StageLinks:
    def __init__(self, pp_mesh: DeviceMesh, device: torch.device):
        self.group = pp_mesh.get_group()
        self.ranks = pp_mesh.mesh.flatten().tolist()  # global ranks of the stages, in order
        self.stage = pp_mesh.get_local_rank()
        self.device = device

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == len(self.ranks) - 1

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's hidden states."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buffer, src=self.ranks[self.stage - 1], group=self.group)
        return buffer

    def send(self, hidden: torch.Tensor) -> None:
        """To the next stage."""
        dist.send(hidden.contiguous(), dst=self.ranks[self.stage + 1], group=self.group)

    def from_last(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """The last stage's float32 `value` on every stage (the others pass None)."""
        return self._broadcast(value, shape, self.ranks[-1])

    def from_first(self, compute: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """What the first stage computes (it alone holds the vision tower) on every stage."""
        return self._broadcast(compute() if self.first else None, shape, self.ranks[0]).cpu()

    def _broadcast(self, value: torch.Tensor | None, shape: tuple[int, ...], source: int) -> torch.Tensor:
        if value is None:
            value = torch.empty(shape, dtype=torch.float32, device=self.device)
        else:
            value = value.to(self.device, torch.float32).contiguous()
        dist.broadcast(value, src=source, group=self.group)
        return value
