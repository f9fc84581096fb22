"""FLOPs per iteration, device peaks / MFU, CPU peak memory, Megatron-style log lines.

FLOPs count matmuls only, 2 per multiply-add (Megatron-LM's convention; norms, softmax,
rotary and the loss are < 1% for these shapes). Every matmul is counted exactly:
  - forward: all projections, FFNs (SwiGLU = 3 matmuls, GELU / ReLU MLP = 2), attention
    scores and mixing (2 x Sq x Sk x inner each, the causal mask not subtracted, as
    Megatron and torch's FlopCounterMode count), the patch-embedding conv, the Causal
    Former's output projection, the LM head and the regression head;
  - backward: 2 x forward (input and weight gradients), except the patch-embedding conv,
    whose input (pixels) needs no gradient: 1 x;
  - recompute: full recompute reruns the forward of each recomputed block except its
    last matmul (FFN down-projection), whose output no gradient needs: torch's
    non-reentrant checkpoint stops recomputing once every saved tensor is back;
    selective reruns the attention core (scores and mixing) of every block.
Checked against torch.utils.flop_counter on the tiny preset (tests/test_flops.py).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_emu.config import ModelConfig


# -- FLOPs --------------------------------------------------------------------------
def attention_flops(q_tokens: int, kv_tokens: int, width: int, kv_width: int, inner: int) -> tuple[int, int]:
    """(projection FLOPs, core FLOPs) of one attention: q/o on `width`, k/v on `kv_width`."""
    projections = 2 * 2 * q_tokens * width * inner + 2 * 2 * kv_tokens * kv_width * inner
    core = 2 * 2 * q_tokens * kv_tokens * inner  # QK^T and softmax @ V
    return projections, core


@dataclass
class BlockFlops:
    """Forward FLOPs of one transformer block, split so recompute can be priced."""

    dense: int  # projections + FFN
    core: int  # attention scores and mixing
    last: int  # the final FFN matmul (skipped by full recompute's early stop)

    @property
    def total(self) -> int:
        return self.dense + self.core


def vision_block_flops(config: ModelConfig) -> BlockFlops:  # per image
    v = config.vision
    proj, core = attention_flops(v.num_tokens, v.num_tokens, v.width, v.width, v.width)
    fc = 2 * v.num_tokens * v.width * v.mlp_dim
    return BlockFlops(proj + 2 * fc, core, fc)


def causal_former_block_flops(config: ModelConfig) -> BlockFlops:  # per image
    c, q = config.causal_former, config.causal_former.num_query_tokens
    inner = c.heads * c.head_dim
    self_proj, self_core = attention_flops(q, q, c.d_model, c.d_model, inner)
    cross_proj, cross_core = attention_flops(q, config.vision.num_tokens, c.d_model, config.vision.width, inner)
    ffn = 2 * q * c.d_model * c.ffn_dim
    return BlockFlops(self_proj + cross_proj + 2 * ffn, self_core + cross_core, ffn)


def llm_block_flops(config: ModelConfig, seq_length: int) -> BlockFlops:  # per sequence
    m = config.llm
    proj, core = attention_flops(seq_length, seq_length, m.hidden, m.hidden, m.hidden)
    ffn = 2 * seq_length * m.hidden * m.ffn_dim
    return BlockFlops(proj + 3 * ffn, core, ffn)


def patch_embed_flops(config: ModelConfig) -> int:  # per image
    v = config.vision
    return 2 * v.num_patches * 3 * v.patch_size**2 * v.width


def heads_flops(config: ModelConfig, seq_length: int) -> int:
    """LM head + regression head per sequence, and the Causal Former's projection per image."""
    m = config.llm
    return 2 * seq_length * m.hidden * (m.vocab_size + m.hidden)


def causal_former_proj_flops(config: ModelConfig) -> int:  # per image
    c = config.causal_former
    return 2 * c.num_query_tokens * c.d_model * config.llm.hidden


def forward_flops(config: ModelConfig, sequences: int, seq_length: int, images: int) -> int:
    """One forward pass over `sequences` sequences holding `images` images."""
    per_image = (patch_embed_flops(config) + config.vision.layers * vision_block_flops(config).total
                 + config.causal_former.layers * causal_former_block_flops(config).total
                 + causal_former_proj_flops(config))
    per_sequence = config.llm.layers * llm_block_flops(config, seq_length).total + heads_flops(config, seq_length)
    return images * per_image + sequences * per_sequence


def recompute_flops(config: ModelConfig, sequences: int, seq_length: int, images: int,
                    granularity: str | None, num_layers: int | None = None) -> int:
    """Extra forward FLOPs that activation recompute reruns in backward."""
    if granularity is None:
        return 0
    stacks = (  # (blocks in the stack, FLOPs of one block, how many times it runs)
        (config.vision.layers, vision_block_flops(config), images),
        (config.causal_former.layers, causal_former_block_flops(config), images),
        (config.llm.layers, llm_block_flops(config, seq_length), sequences),
    )
    extra = 0
    for layers, block, count in stacks:
        if granularity == "selective":
            extra += layers * block.core * count
        else:  # full: the first N blocks of each stack
            recomputed = min(layers, layers if num_layers is None else num_layers)
            extra += recomputed * (block.total - block.last) * count
    return extra


def training_flops(config: ModelConfig, sequences: int, seq_length: int, images: int,
                   recompute: str | None = None, recompute_num_layers: int | None = None) -> int:
    """Forward + backward (+ recompute) FLOPs of one optimizer step."""
    forward = forward_flops(config, sequences, seq_length, images)
    backward = 2 * forward - images * patch_embed_flops(config)  # pixels need no gradient
    return forward + backward + recompute_flops(config, sequences, seq_length, images, recompute, recompute_num_layers)


def stage_flops(config: ModelConfig, micro_batch_size: int, seq_length: int, images_per_sample: float,
                layers: int, first: bool, last: bool, recompute: str | None = None,
                recompute_num_layers: int | None = None) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro-batch through one pipeline stage
    holding `layers` LLaMA layers; the first stage also runs the ViT, the Causal Former and
    the patch embedding, the last one the LM and regression heads."""
    b, s = micro_batch_size, seq_length
    images = b * images_per_sample
    stacks = [(llm_block_flops(config, s), layers, b)]
    flops = 0.0
    if first:
        stacks += [(vision_block_flops(config), config.vision.layers, images),
                   (causal_former_block_flops(config), config.causal_former.layers, images)]
        flops += 3 * images * (patch_embed_flops(config) + causal_former_proj_flops(config))
    if last:
        flops += 3 * b * heads_flops(config, s)
    for block, count, runs in stacks:
        recomputed = count if recompute_num_layers is None else min(count, recompute_num_layers)
        extra = {None: 0, "selective": count * block.core, "full": recomputed * (block.total - block.last)}
        flops += runs * (3 * count * block.total + extra[recompute])
    return flops


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
