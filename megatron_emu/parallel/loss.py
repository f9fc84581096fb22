"""The mixed CE + lambda * l2 loss (model/loss.py) when the heads are tensor-parallel.

- Cross-entropy: logits are vocab-sharded DTensors; under `loss_parallel()` (which
  must also wrap the backward) F.cross_entropy reduces max / sum-exp / target logit
  over TP without gathering the vocabulary.
- l2: the regression output is sharded along the hidden dim. Each rank sums the
  squared error of its columns; the sum is a Partial DTensor reduced over TP, then
  divided by (positions x hidden), exactly F.mse_loss's mean.
- Padded vocabulary (--make-vocab-size-divisible-by): each rank sets the logits of
  its padded columns to -inf (no communication), so they never take probability mass.
Without TP the tensors are plain and model/loss.py runs unchanged (it slices them off).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Shard

from megatron_emu.config import SpecialTokens
from megatron_emu.model.loss import EmuLoss, cross_entropy_loss, emu_loss, regression_mask


def mixed_loss(logits, regression, inputs, tokens, special: SpecialTokens, l2_weight: float = 1.0,
               vocab_size: int | None = None, document_ids: torch.Tensor | None = None,
               answer_mask: torch.Tensor | None = None) -> EmuLoss:
    """vocab_size: the real vocabulary (logits may carry padded columns beyond it);
    document_ids: packed rows; answer_mask: instruction tuning (model/loss.py)."""
    if not isinstance(logits, DTensor):
        return emu_loss(logits, regression, inputs, tokens, special, l2_weight, vocab_size, document_ids, answer_mask)
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = mask_padded_vocab(logits, vocab_size)
    # vocab-parallel under loss_parallel()
    lm = cross_entropy_loss(logits, tokens, special, document_ids=document_ids, answer_mask=answer_mask)
    lm = lm.full_tensor() if isinstance(lm, DTensor) else lm
    l2 = sharded_l2_loss(regression, inputs, tokens, special, document_ids, answer_mask)
    return EmuLoss(lm + l2_weight * l2, lm, l2)


def mask_padded_vocab(logits: DTensor, vocab_size: int) -> DTensor:
    """logits: (B, S, V_padded) sharded on V over TP; columns >= vocab_size -> -inf, locally."""
    local = logits.to_local()  # (B, S, V_padded/TP)
    start = logits.device_mesh.get_local_rank() * local.shape[-1]  # even split: validated
    padded = torch.arange(start, start + local.shape[-1], device=local.device) >= vocab_size  # (V_padded/TP,)
    masked = local.masked_fill(padded, float("-inf"))
    return DTensor.from_local(masked, logits.device_mesh, [Shard(-1)], run_check=False)


def sharded_l2_loss(regression: DTensor, inputs: torch.Tensor, tokens: torch.Tensor, special: SpecialTokens,
                    document_ids: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """regression: DTensor (B, S, H) sharded on H over TP; inputs: full (B, S, H) targets."""
    mask = regression_mask(tokens, special, document_ids, answer_mask)  # (B, S-1)
    local = regression.to_local()  # (B, S, H/TP)
    width, hidden = local.shape[-1], regression.shape[-1]
    start = regression.device_mesh.get_local_rank() * width  # even split: validated H % TP == 0
    predicted = local[:, :-1][mask].float()  # (M, H/TP)
    target = inputs[:, 1:, start : start + width][mask].detach().float()  # (M, H/TP)
    if predicted.shape[0] == 0:
        return local.sum() * 0.0  # no image in this micro-batch; keeps the graph
    squared = (predicted - target).pow(2).sum()  # this rank's columns
    # Partial -> Replicate is an all-reduce forward and a pass-through backward: each
    # rank's columns get exactly their own gradient.
    total = DTensor.from_local(squared, regression.device_mesh, [Partial()]).full_tensor()
    return total / (predicted.shape[0] * hidden)
