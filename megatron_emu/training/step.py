"""One optimizer step, and one validation pass, over this rank's micro-batches.

Every rank calls these with the same number of micro-batches; with pipeline
parallelism the schedule (parallel/pipeline.py) runs them, else a plain loop. Loss
values are reduced so that every rank returns the same global-batch means.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from megatron_emu.config import TrainConfig
from megatron_emu.model.loss import EmuLoss
from megatron_emu.parallel.data_parallel import clip_grad_norm_global, gradient_sync, reduce_partial_grads
from megatron_emu.parallel.loss import mixed_loss
from megatron_emu.parallel.parallelize import ParallelModel
from megatron_emu.training.failsafe import step_is_finite
from megatron_emu.training.precision import Precision
from megatron_emu.training.timers import Timers


@dataclass
class StepResult:
    lm_loss: float
    l2_loss: float
    grad_norm: float
    images: int  # images encoded in this step (for FLOPs)
    sequences: int  # seq_length rows computed in this step (fewer than samples when packed)
    skipped: bool = False  # no optimizer update: non-finite loss / grad norm, or fp16 overflow
    nonfinite: bool = False  # the loss or the gradient norm was NaN/inf


def pipeline_loss_fn(losses: list, config: TrainConfig, feed=None):
    """The last stage's loss: the schedule calls it per micro-batch with the stage outputs and
    the micro-batch's index. feed (the step's micro-batches, pipeline.MicrobatchFeed): where
    the last stage reads an instruction batch's answer mask, which stages do not send."""
    special, vocab = config.model.special_tokens, config.model.llm.vocab_size

    def loss_fn(outputs, index):
        logits, regression, targets, tokens, *documents = outputs  # document ids: packed rows
        answers = feed[int(index[0])].get("answer_mask") if feed is not None else None
        loss = mixed_loss(logits, regression, targets, tokens, special, config.l2_loss_weight, vocab,
                          documents[0] if documents else None, answers)
        losses.append((loss.lm.detach(), loss.l2.detach()))
        return loss.total

    return loss_fn


def forward_backward(pmodel: ParallelModel, microbatches: list[dict], config: TrainConfig, precision: Precision) -> None:
    """Gradients of the mean loss over the micro-batches, accumulated in .grad."""
    if pmodel.schedule is not None:
        with precision.autocast():
            pmodel.schedule.step(microbatches)  # grads scaled by 1/n inside
        return
    n = len(microbatches)
    for i, batch in enumerate(microbatches):
        gradient_sync(pmodel.parts, enabled=i == n - 1)  # DP reduces once, on the last one
        with precision.autocast():
            loss = microbatch_loss(pmodel, batch, config)
        precision.backward(loss.total / n)
        pmodel.losses.append((loss.lm.detach(), loss.l2.detach()))


def vocab_parallel_loss(pmodel: ParallelModel):
    """Under TP the cross-entropy is vocab-parallel: its forward and backward both run
    inside loss_parallel(); without TP, nothing to enter."""
    tp = pmodel.pmesh.dims.tp if pmodel.pmesh is not None else 1
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def microbatch_loss(pmodel: ParallelModel, batch: dict, config: TrainConfig) -> EmuLoss:
    """The mixed loss of one micro-batch on the whole (non-pipelined) model."""
    documents = batch.get("document_ids")  # packed rows
    out = pmodel.parts[0](batch["tokens"], batch["images"], documents)
    return mixed_loss(*out, batch["tokens"], config.model.special_tokens, config.l2_loss_weight,
                      config.model.llm.vocab_size, documents, batch.get("answer_mask"))


def train_step(pmodel: ParallelModel, optimizer, microbatches: list[dict], config: TrainConfig,
               precision: Precision | None = None, timers: Timers | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip by the global norm, one optimizer step.

    The step is skipped (parameters and Adam states untouched) when the loss or the gradient
    norm is not finite: both are reduced over every rank first, so all ranks skip together."""
    precision = precision or Precision(config.performance, microbatches[0]["tokens"].device.type)
    timers = timers or Timers(0, microbatches[0]["tokens"].device)  # level 0: every timer a no-op
    optimizer.zero_grad(set_to_none=True)
    pmodel.losses.clear()
    with timers("forward-backward"), timers.pipeline_waits(), vocab_parallel_loss(pmodel):
        forward_backward(pmodel, microbatches, config, precision)
    with timers("grads-reduce"):
        reduce_partial_grads(pmodel.parts, pmodel.pmesh)
    images = sum(batch["images"].shape[0] for batch in microbatches)
    rows = sum(batch["tokens"].shape[0] for batch in microbatches)
    with timers("optimizer"):
        precision.unscale_(optimizer)  # fp16: true gradients before clipping
        with timers("optimizer-clip-main-grad"):
            grad_norm = clip_grad_norm_global(pmodel.parts, config.optimizer.clip_grad, pmodel.pmesh)
        # The update waits for the global loss (one small all-reduce): NaN/inf skips it everywhere.
        lm, l2, images, rows = reduce_step_stats(pmodel, len(microbatches), images, rows)
        nonfinite = not step_is_finite(lm, l2, grad_norm)
        skip = nonfinite and config.failsafe.check_for_nan_in_loss_and_grad
        stepped = precision.step(optimizer, skip=skip)  # fp16: also skipped when gradients overflowed
    return StepResult(lm, l2, grad_norm, images, rows, skipped=not stepped, nonfinite=nonfinite)


def reduce_step_stats(pmodel: ParallelModel, n_micro: int, images: int, rows: int) -> tuple[float, float, int, int]:
    """Mean lm / l2 over the global batch, its image and row counts, identical on every rank.

    Each value is counted once: losses on the loss-computing ranks of TP rank 0,
    images and rows on TP rank 0 of the first pipeline rank; one all-reduce sums the DP ranks.
    """
    recorded = pmodel.losses[-n_micro:]
    lm = sum(float(l) for l, _ in recorded)
    l2 = sum(float(r) for _, r in recorded)
    pmesh = pmodel.pmesh
    if pmesh is None:
        return lm / n_micro, l2 / n_micro, images, rows
    tp0 = pmesh.tp_rank == 0
    counts = pmodel.computes_loss and tp0, pmesh.pp_rank == 0 and tp0
    stats = torch.tensor([lm * counts[0], l2 * counts[0], images * counts[1], rows * counts[1]],
                         dtype=torch.float64, device=pmesh.device)
    dist.all_reduce(stats)
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
        pmodel.losses.clear()
        with vocab_parallel_loss(pmodel), precision.autocast():
            if pmodel.schedule is not None:
                pmodel.schedule.step(microbatches, forward_only=True)
            else:
                for batch in microbatches:
                    loss = microbatch_loss(pmodel, batch, config)
                    pmodel.losses.append((loss.lm, loss.l2))
        step_lm, step_l2, _, _ = reduce_step_stats(pmodel, len(microbatches), 0, 0)
        lm, l2 = lm + step_lm / len(steps), l2 + step_l2 / len(steps)
    pmodel.losses.clear()
    reshard(pmodel)
    return lm, l2


def reshard(pmodel: ParallelModel) -> None:
    """Under PP, FSDP2 keeps parameters gathered from forward until backward; a forward-only
    pass has no backward, so free them here."""
    for part in pmodel.parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
