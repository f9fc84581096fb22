"""Planner, activation side: bytes each block type saves for backward, measured on fake
tensors at the planned per-rank shapes (no memory, no compute, any model size).

Each block type (LLaMA layer, EVA block, Causal Former block, the encoder around its
blocks, the heads) runs once under FakeTensorMode with a saved-tensors hook; storages
are summed once each, weights excluded. Recompute is modelled from the same run: a
fully recomputed block keeps its input, a selectively recomputed one the outputs of its
matmuls (activation_checkpoint.py's policy). planner.py turns these into per-rank totals.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_emu.config import ModelConfig
from megatron_emu.memo import cached


# -- activations, measured on fake tensors ------------------------------------------
@dataclass(frozen=True)
class BlockActivations:
    saved: int  # bytes saved for backward, no recompute
    inputs: int  # the block's inputs (all a fully recomputed block keeps)
    matmul_outputs: int  # outputs of mm / addmm / conv (what selective recompute keeps)


class _MatmulOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS:
            self.bytes += out.untyped_storage().nbytes()
        return out


def measure_saved(module: nn.Module, inputs: tuple, dtype: torch.dtype, shared: tuple = ()) -> BlockActivations:
    """Run `module(*inputs)` (fake tensors) and sum the storages autograd saves, minus the
    weights and `shared` tensors (held once for all blocks, e.g. the visual tokens).
    inputs[0] is the residual stream: what a fully recomputed block keeps."""
    weights = {t.untyped_storage()._cdata for t in (*module.parameters(), *shared)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    matmuls = _MatmulOutputs()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), matmuls:
            module(*inputs)
    in_bytes = inputs[0].untyped_storage().nbytes() if inputs[0].is_floating_point() else 0
    return BlockActivations(sum(saved.values()), in_bytes, matmuls.bytes + in_bytes)


def shard_for_tp(module: nn.Module, tp: int) -> None:
    """Narrow each block's linears to one TP rank's shard (column / row parallel)."""
    if tp == 1:
        return
    column = ("wq", "wk", "wv", "w1", "w3", "q_proj", "k_proj", "v_proj", "fc1", "q", "k", "v", "wi")
    row = ("wo", "w2", "proj", "fc2", "o")
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if name in column:
                setattr(parent, name, nn.Linear(child.in_features, child.out_features // tp, bias=child.bias is not None))
            elif name in row:
                setattr(parent, name, nn.Linear(child.in_features // tp, child.out_features, bias=child.bias is not None))


@dataclass(frozen=True)
class ActivationProfile:
    """Per micro-batch bytes: blocks per image (vision, Causal Former) or per micro-batch (LLaMA)."""

    llm_layer: BlockActivations
    vision_block: BlockActivations
    causal_former_block: BlockActivations
    encoder_rest: int  # per image: pixels, patch embedding, ln_visual, Causal Former head
    llm_head: int  # per micro-batch: final norm, LM head, regression head, loss buffers


@cached
def activation_profile(config: ModelConfig, micro_batch_size: int, seq_length: int, tp: int, dtype: str,
                       bf16_weights: bool, encoder_tp: tuple[int, int] | None = None) -> ActivationProfile:
    """encoder_tp: (ViT, Causal Former) TP shards of their blocks; None: `tp` for both. 1 for
    an encoder that TP replicates (placed on images, or heads that TP does not divide)."""
    from megatron_emu.model.emu import Emu
    from megatron_emu.model.llama import rotary_tables, token_positions

    compute = getattr(torch, dtype)
    weight_dtype = compute if bf16_weights else torch.float32
    b, s, v, c = micro_batch_size, seq_length, config.vision, config.causal_former
    vision_tp, cf_tp = encoder_tp or (tp, tp)
    with FakeTensorMode(), _default_dtype(weight_dtype):
        emu = Emu(_one_block_each(config))  # the blocks measured; the depth changes none of them
        for block, shards in ((emu.llm.layers["0"], tp), (emu.visual.blocks[0], vision_tp),
                              (emu.causal_former.blocks[0], cf_tp)):
            shard_for_tp(block, shards)
        hidden = lambda *shape: torch.randn(*shape, dtype=weight_dtype, requires_grad=True)  # noqa: E731
        positions = token_positions(rotary_tables(config.llm, s), s)
        llm = measure_saved(emu.llm.layers["0"], (hidden(b, s, config.llm.hidden), positions), compute)
        vis = measure_saved(emu.visual.blocks[0], (hidden(1, v.num_tokens, v.width),), compute)
        visual = hidden(1, v.num_tokens, v.width)
        bias = torch.randn(1, c.heads // cf_tp, c.num_query_tokens, c.num_query_tokens, dtype=weight_dtype)
        cf = measure_saved(emu.causal_former.blocks[0], (hidden(1, c.num_query_tokens, c.d_model), visual, bias), compute,
                           shared=(visual,))
        # The whole encoder of one image with 0 blocks = everything around the blocks.
        bare = dataclasses.replace(config, vision=dataclasses.replace(v, layers=0),
                                   causal_former=dataclasses.replace(c, layers=0))
        encoder = Emu(bare)
        pixels = torch.zeros(1, 3, v.image_size, v.image_size, dtype=torch.uint8)
        rest = measure_saved(_Encoder(encoder), (pixels,), compute).saved
        rest += visual.untyped_storage().nbytes() if c.layers else 0  # shared by the Causal Former blocks
        head = measure_saved(_Head(encoder), (hidden(b, s, config.llm.hidden),), compute).saved
    # Cross-entropy keeps fp32 log-probabilities of (B, S-1, V / TP) (loss.py casts to fp32).
    loss = 4 * b * (s - 1) * config.llm.vocab_size // tp
    return ActivationProfile(llm, vis, cf, rest, head + loss)


def _one_block_each(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, layers=1),
                               vision=dataclasses.replace(config.vision, layers=1),
                               causal_former=dataclasses.replace(config.causal_former, layers=1))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (fake parameters cannot be converted afterwards)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class _Encoder(nn.Module):
    def __init__(self, emu):
        super().__init__()
        self.emu = emu

    def forward(self, images):
        return self.emu.encode_images(images)


class _Head(nn.Module):
    def __init__(self, emu):
        super().__init__()
        self.emu = emu

    def forward(self, hidden):
        h = self.emu.llm.norm(hidden)
        return self.emu.llm.output(h), self.emu.regression_head(h)


def block_bytes(block: BlockActivations, recompute: str | None, recomputed: bool) -> int:
    if not recomputed or recompute is None:
        return block.saved
    return block.inputs if recompute == "full" else min(block.matmul_outputs, block.saved)
