"""Activation recompute and torch.compile, applied from outside the model (as
torchtitan's apply_ac / apply_compile), in the fixed order TP -> recompute -> compile
-> FSDP/DDP.

Three transformer stacks are wrapped block by block: the EVA ViT, the Causal Former and
LLaMA (Emu.transformer_stacks: where they are, for every pipeline stage).

- full (`--recompute-granularity full [--recompute-num-layers N]`): the first N blocks
  of each stack keep only their inputs; the whole block reruns in backward.
- selective (`--recompute-activations`): every block keeps the outputs of its
  projection / FFN matmuls and recomputes the rest in backward: the attention core
  (QK^T, softmax, @V, or the fused SDPA kernel, whose (S x S) scores Megatron's
  selective recompute targets) and the cheap elementwise ops (norms, rotary, SiLU).

Blocks get a checkpointed `forward` on the instance instead of a wrapper module, so
parameter names (TP plans, optimizer groups, checkpoints) do not change.
"""

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatron_emu.config import PerformanceConfig

log = logging.getLogger("megatron_emu")

# Outputs kept by selective recompute: the matmuls of the linear layers (and the
# patch-embedding conv). Attention's own matmuls run as bmm or a fused SDPA kernel.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.convolution.default,
}
if hasattr(torch.ops, "_c10d_functional"):
    # Sequence-parallel collectives are not worth redoing in backward.
    _SAVED_OPS.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)


_RECOMPILES_PER_STACK = 8  # dynamo's default recompile_limit


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def checkpoint_block(block: nn.Module, selective: bool) -> None:
    """Replace `block.forward` by a non-reentrant checkpoint of the original forward."""
    inner = block.forward
    context_fn = _selective_context if selective else None
    # Emu itself has no dropout, but LoRA adapters may (--lora-dropout): then the recomputed
    # forward must draw the same mask as the first one, or the gradients are of another net.
    replay_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules())

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        extra = {"context_fn": context_fn} if context_fn else {}
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=replay_rng, **extra, **kwargs)

    block.forward = forward


def apply_activation_checkpointing(model: nn.Module, config: PerformanceConfig) -> dict[str, int]:
    """Wrap blocks per `config.recompute_granularity`; returns blocks wrapped per stack."""
    granularity = config.recompute_granularity
    wrapped = {}
    if granularity is None:
        return wrapped
    for name, blocks in model.transformer_stacks().items():
        count = len(blocks)
        if granularity == "full" and config.recompute_num_layers is not None:
            count = min(config.recompute_num_layers, count)
        for block in blocks[:count]:
            checkpoint_block(block, selective=granularity == "selective")
        wrapped[name] = count
    log.info("activation recompute (%s): %s", granularity, wrapped)
    return wrapped


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each transformer block in place (blocks repeat: one compiled graph
    serves a whole stack); returns the number of blocks compiled."""
    stacks = model.transformer_stacks()
    # dynamo's recompile budget is per code object, and every checkpointed block runs the
    # same `forward` closure (checkpoint_block): the three stacks (different arguments)
    # and their shape variants (images per micro-batch) would share one budget of 8 and
    # silently fall back to eager past it. Give each stack the default budget.
    budget = _RECOMPILES_PER_STACK * len(stacks)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, budget)
    count = 0
    for blocks in stacks.values():
        for block in blocks:
            block.compile(backend=backend)
            count += 1
    log.info("torch.compile: %d blocks (backend %s)", count, backend)
    return count


def apply_recompute_and_compile(part: nn.Module, config: PerformanceConfig) -> None:
    """Both steps in their fixed order; call after TP and before FSDP/DDP."""
    apply_activation_checkpointing(part, config)
    if config.compile:
        apply_compile(part, config.compile_backend)
