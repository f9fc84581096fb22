"""One optimizer step, and one validation pass, over this rank's micro-batches.

Every rank calls these with the same number of micro-batches; with pipeline
parallelism the schedule (parallel/pipeline.py) runs them, else a plain loop. Either
way the forward returns the loss terms of each micro-batch this rank computed, and
they are reduced so that every rank returns the same global-batch means.

The objective (spec section 4) is model/loss.py's emu_loss; parallel/loss.py's
mixed_loss is the same objective on tensor-parallel heads (and emu_loss otherwise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from megatron_emu.config import TrainConfig
from megatron_emu.data.packing import pad_rows
from megatron_emu.model.emu import EmuOutput
from megatron_emu.model.loss import EmuLoss
from megatron_emu.parallel.data_parallel import (all_reduce_if_distributed, clip_grad_norm_global, gradient_sync,
                                                 reduce_partial_grads)
from megatron_emu.parallel.loss import mixed_loss
from megatron_emu.parallel.parallelize import ParallelModel
from megatron_emu.training.failsafe import step_is_finite
from megatron_emu.training.precision import Precision
from megatron_emu.training.timers import Timers

LossTerms = tuple[torch.Tensor, torch.Tensor]  # (lm, l2) of one micro-batch, detached


@dataclass
class StepResult:
    lm_loss: float
    l2_loss: float
    grad_norm: float
    images: int  # images encoded in this step (for FLOPs)
    sequences: int  # seq_length rows computed in this step (fewer than samples when packed)
    skipped: bool = False  # no optimizer update: non-finite loss / grad norm, or fp16 overflow
    nonfinite: bool = False  # the loss or the gradient norm was NaN/inf
    # (lm, l2) of each micro-batch whose loss this rank computed (PP: the last stage's ranks).
    microbatch_losses: list[tuple[float, float]] = field(default_factory=list)


def emu_objective(config: TrainConfig):
    """The loss of one micro-batch: (Emu's outputs, the micro-batch) -> EmuLoss. The same
    function runs on the whole model and, with pipelining, on the last stage."""
    special, weight, vocab = config.model.special_tokens, config.l2_loss_weight, config.model.llm.vocab_size

    def objective(outputs: EmuOutput, batch: dict) -> EmuLoss:
        return mixed_loss(*outputs, batch["tokens"], special, weight, vocab,
                          batch.get("document_ids"), batch.get("answer_mask"))  # packed rows; instruction tuning

    return objective


def forward_backward(pmodel: ParallelModel, microbatches: list[dict], config: TrainConfig, precision: Precision,
                     forward_only: bool = False) -> list[LossTerms]:
    """Gradients of the mean loss over the micro-batches, accumulated in .grad (none when
    forward_only); returns the loss terms of each micro-batch this rank computed."""
    if pmodel.schedule is not None:
        with precision.autocast():
            return pmodel.schedule.step(equal_rows(microbatches, config), forward_only)  # grads scaled by 1/n inside
    objective, n, losses = emu_objective(config), len(microbatches), []
    for i, batch in enumerate(microbatches):
        gradient_sync(pmodel.parts, enabled=i == n - 1)  # DP reduces once, on the last one
        with precision.autocast():
            outputs = pmodel.parts[0](batch["tokens"], batch["images"], batch.get("document_ids"))
            loss = objective(outputs, batch)
        if not forward_only:
            precision.backward(loss.total / n)
        losses.append((loss.lm.detach(), loss.l2.detach()))
    return losses


def equal_rows(microbatches: list[dict], config: TrainConfig) -> list[dict]:
    """Packed micro-batches hold a varying number of rows; pipeline stages need one shape
    per step, so the shorter ones get [PAD] rows (which carry no loss)."""
    if not all("document_ids" in b for b in microbatches):
        return microbatches
    rows = max(b["tokens"].shape[0] for b in microbatches)
    return [pad_rows(b, rows, config.model.special_tokens.pad) for b in microbatches]


def vocab_parallel_loss(pmodel: ParallelModel):
    """Under TP the cross-entropy is vocab-parallel: its forward and backward both run
    inside loss_parallel(); without TP, nothing to enter."""
    return loss_parallel() if pmodel.pmesh.dims.tp > 1 else contextlib.nullcontext()


def train_step(pmodel: ParallelModel, optimizer, microbatches: list[dict], config: TrainConfig,
               precision: Precision | None = None, timers: Timers | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip by the global norm, one optimizer step.

    The step is skipped (parameters and Adam states untouched) when the loss or the gradient
    norm is not finite: both are reduced over every rank first, so all ranks skip together."""
    precision = precision or Precision(config.performance, microbatches[0]["tokens"].device.type)
    timers = timers or Timers(0, microbatches[0]["tokens"].device)  # level 0: every timer a no-op
    optimizer.zero_grad(set_to_none=True)
    with timers("forward-backward"), timers.pipeline_waits(), vocab_parallel_loss(pmodel):
        losses = forward_backward(pmodel, microbatches, config, precision)
    with timers("grads-reduce"):
        reduce_partial_grads(pmodel.parts, pmodel.pmesh)
    images = sum(batch["images"].shape[0] for batch in microbatches)
    rows = sum(batch["tokens"].shape[0] for batch in microbatches)
    with timers("optimizer"):
        precision.unscale_(optimizer)  # fp16: true gradients before clipping
        with timers("optimizer-clip-main-grad"):
            grad_norm = clip_grad_norm_global(pmodel.parts, config.optimizer.clip_grad, pmodel.pmesh)
        # The update waits for the global loss (one small all-reduce): NaN/inf skips it everywhere.
        lm, l2, images, rows = reduce_step_stats(pmodel, losses, len(microbatches), images, rows)
        nonfinite = not step_is_finite(lm, l2, grad_norm)
        skip = nonfinite and config.failsafe.check_for_nan_in_loss_and_grad
        stepped = precision.step(optimizer, skip=skip)  # fp16: also skipped when gradients overflowed
    return StepResult(lm, l2, grad_norm, images, rows, skipped=not stepped, nonfinite=nonfinite,
                      microbatch_losses=[(float(a), float(b)) for a, b in losses])


def reduce_step_stats(pmodel: ParallelModel, losses: list[LossTerms], n_micro: int, images: int,
                      rows: int) -> tuple[float, float, int, int]:
    """Mean lm / l2 over the global batch, its image and row counts, identical on every rank.

    Each value is counted once: `losses` (this rank's micro-batches) on the loss-computing
    ranks of TP rank 0, images and rows on TP rank 0 of the first pipeline rank; one
    all-reduce sums the DP ranks.
    """
    lm = sum(float(l) for l, _ in losses)
    l2 = sum(float(r) for _, r in losses)
    pmesh = pmodel.pmesh
    tp0 = pmesh.tp_rank == 0
    counts = pmodel.computes_loss and tp0, pmesh.pp_rank == 0 and tp0
    stats = torch.tensor([lm * counts[0], l2 * counts[0], images * counts[1], rows * counts[1]],
                         dtype=torch.float64, device=pmesh.device)
    all_reduce_if_distributed(stats)
    total = n_micro * pmesh.dims.dp
    return float(stats[0]) / total, float(stats[1]) / total, int(stats[2]), int(stats[3])


@torch.no_grad()
def validation_loss(pmodel: ParallelModel, steps: list[list[dict]], config: TrainConfig,
                    precision: Precision | None = None) -> tuple[float, float]:
    """Mean lm / l2 loss over `steps` (each: one global batch's micro-batches for this rank),
    forward only, through the same layout (the pipeline schedule's forward-only `eval`)."""
    precision = precision or Precision(config.performance, steps[0][0]["tokens"].device.type)
    lm = l2 = 0.0
    for microbatches in steps:
        with vocab_parallel_loss(pmodel):
            losses = forward_backward(pmodel, microbatches, config, precision, forward_only=True)
        step_lm, step_l2, _, _ = reduce_step_stats(pmodel, losses, len(microbatches), 0, 0)
        lm, l2 = lm + step_lm / len(steps), l2 + step_l2 / len(steps)
    reshard(pmodel)
    return lm, l2


def reshard(pmodel: ParallelModel) -> None:
    """Under PP, FSDP2 keeps parameters gathered from forward until backward; a forward-only
    pass has no backward, so free them here."""
    for part in pmodel.parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
