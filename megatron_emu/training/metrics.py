"""Device peaks / MFU, CPU peak memory, Megatron-style log lines; the FLOPs model is
model/flops.py (re-exported here: the log lines' TFLOP/s use it)."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_emu.model.flops import (  # noqa: F401 (the FLOPs model, re-exported)
    BlockFlops, attention_flops, causal_former_block_flops, causal_former_proj_flops, forward_flops, heads_flops,
    llm_block_flops, patch_embed_flops, recompute_flops, stage_flops, training_flops, vision_block_flops,
)


# -- device peaks and MFU ------------------------------------------------------------
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets (SXM parts).
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def measure_cpu_matmul_tflops(size: int = 1024, iters: int = 30, dtype=torch.float32) -> float:
    """Best-of-`iters` square matmul rate on this CPU: the MFU denominator on CPU (best,
    not mean, so that other processes on the machine lower it as little as possible)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm up threads and caches
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(device: torch.device, dtype=torch.float32, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where the number comes from) for one device."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"data sheet ({name}, dense bf16)"
        raise ValueError(f"no peak TFLOP/s known for GPU {name!r}; pass --peak-tflops")
    return measure_cpu_matmul_tflops(dtype=dtype), f"measured CPU matmul peak ({dtype})"


def mfu(model_flops_per_s: float, peak_tflops: float) -> float:
    return model_flops_per_s / (peak_tflops * 1e12)


# -- CPU peak memory -----------------------------------------------------------------
class CPUPeakMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages on CPU, counted exactly while active.

    torch keeps no allocator statistics on CPU, so every op's outputs are recorded by
    storage (views count once) and dropped when the storage is freed. Tensors created
    before entering (weights, the batch) are added with `track`. Two things multi-rank
    training needs: a DTensor counts as its local shard (what this rank holds), and live
    bytes are recounted from each storage's current size after every op, because FSDP2
    frees gathered parameters with `storage.resize_(0)` rather than dropping the storage."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors) -> None:
        for t in tree_flatten(list(tensors))[0]:
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                self._add(t.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, storage) -> None:
        key = storage._cdata
        if key not in self._live:
            self._live[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
            self._recount()

    def _free(self, key: int) -> None:
        if self._live.pop(key, None) is not None:
            self._recount()

    def _recount(self) -> None:
        storages = (ref() for ref in list(self._live.values()))
        self.current = sum(s.nbytes() for s in storages if s is not None)
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        self._recount()  # a storage resized in place (FSDP2's resize_(0)) shows up here
        return out


# -- log line -----------------------------------------------------------------------
@dataclass
class IterationStats:
    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    lr: float
    global_batch_size: int
    lm_loss: float
    l2_loss: float
    grad_norm: float
    tokens_per_s: float
    tflops_per_device: float
    skipped_iterations: int = 0  # since the last log line: no optimizer update
    nan_iterations: int = 0  # since the last log line: non-finite loss or grad norm
    device_type: str = "cuda"  # the throughput column's unit: TFLOP/s/GPU on CUDA (Megatron's), else per device

    def format(self) -> str:
        """One Megatron-style log line."""
        return (
            f" iteration {self.iteration:8d}/{self.train_iters:8d} |"
            f" consumed samples: {self.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {self.elapsed_ms:.1f} |"
            f" learning rate: {self.lr:.3E} |"
            f" global batch size: {self.global_batch_size:5d} |"
            f" lm loss: {self.lm_loss:.6E} |"
            f" l2 loss: {self.l2_loss:.6E} |"
            f" grad norm: {self.grad_norm:.3f} |"
            f" tokens/s: {self.tokens_per_s:.1f} |"
            f" TFLOP/s/{'GPU' if self.device_type == 'cuda' else 'device'}: {self.tflops_per_device:.3f} |"
            f" number of skipped iterations: {self.skipped_iterations:3d} |"
            f" number of nan iterations: {self.nan_iterations:3d} |"
        )
