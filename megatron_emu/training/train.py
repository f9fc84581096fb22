"""The pretraining loop: build, then iterate over global batches, read top to bottom.

One optimizer step = one global batch = n micro-batches per data-parallel rank;
gradients accumulate over the micro-batches (loss / n each) and data-parallel ranks
reduce them once, after the last. With pipeline parallelism a schedule
(parallel/pipeline.py) runs the micro-batches instead of the plain loop.
The same code runs single-process, under torchrun and under srun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from tqdm import tqdm

from megatron_emu.config import OptimizerConfig, TrainConfig
from megatron_emu.data.loader import build_pretrain_loader, ensure_synthetic_corpus
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.kernels import apply_fused_norms, build_adamw, build_parallel_adamw
from megatron_emu.model.attention import configure_attention
from megatron_emu.model.emu import build_emu
from megatron_emu.parallel.data_parallel import clip_grad_norm_global, gradient_sync, reduce_partial_grads
from megatron_emu.parallel.loss import mixed_loss
from megatron_emu.parallel.mesh import ParallelDims, ParallelMesh, build_mesh, init_distributed
from megatron_emu.parallel.parallelize import ParallelModel, parallelize_emu
from megatron_emu.parallel.activation_checkpoint import apply_recompute_and_compile
from megatron_emu.training.checkpoint import Checkpointer, Layout
from megatron_emu.training.evaluate import image_grounding
from megatron_emu.training.metrics import IterationStats, training_flops
from megatron_emu.training.optim import LRScheduler, apply_freezing
from megatron_emu.training.precision import Precision

log = logging.getLogger("megatron_emu")


@dataclass
class StepResult:
    lm_loss: float
    l2_loss: float
    grad_norm: float
    images: int  # images encoded in this step (for FLOPs)
    sequences: int  # seq_length rows computed in this step (fewer than samples when packed)


@dataclass
class TrainSummary:
    """What a run reports at the end; `history` holds (iteration, lm, l2) per step."""

    history: list[tuple[int, float, float]] = field(default_factory=list)
    grounding: tuple[float, float] | None = None  # text CE with true / shuffled images

    def format(self, window: int = 10) -> str:
        if not self.history:  # e.g. resumed from a checkpoint at --train-iters
            return "summary: no iterations run (the run had already reached --train-iters)"
        first, last = self.history[:window], self.history[-window:]
        mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
        text = (
            f"summary: {len(self.history)} iterations | "
            f"lm loss {mean(first, 1):.4f} -> {mean(last, 1):.4f} | "
            f"l2 loss {mean(first, 2):.4f} -> {mean(last, 2):.4f} "
            f"(means of the first and last {min(window, len(self.history))} iterations)"
        )
        if self.grounding:
            text += f"\nheld-out text CE: {self.grounding[0]:.4f} with the true images, {self.grounding[1]:.4f} with shuffled images"
        return text


def load_tokenizer(config: TrainConfig) -> EmuTokenizer:
    path = config.data.tokenizer_model or build_tiny_tokenizer(config.data.cache_dir or None)
    tokenizer = EmuTokenizer(path)
    expected = config.model.llm.base_vocab_size
    if tokenizer.base_vocab_size != expected:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.base_vocab_size} pieces but preset {config.preset!r} "
            f"expects {expected}"
        )
    return tokenizer


def prepare_caches(config: TrainConfig, world_size: int) -> EmuTokenizer:
    """The tokenizer, after the first rank of each node built the caches a first run needs
    (tiny tokenizer, synthetic corpus) while the node's other ranks wait on a barrier.

    The builders also lock their files, but on a fresh cache N ranks would otherwise all
    queue on the locks (and on filesystems without fcntl locks, race).
    """
    if world_size == 1:
        return load_tokenizer(config)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        tokenizer = load_tokenizer(config)
        if not config.data.data_path:
            ensure_synthetic_corpus(config.data.cache_dir, tokenizer)
    dist.barrier()
    return load_tokenizer(config)


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Building: the model parts this rank trains, and their optimizer
# ---------------------------------------------------------------------------
def build_model(config: TrainConfig, pmesh: ParallelMesh | None, n_micro: int, device: torch.device) -> ParallelModel:
    """Single process: the whole Emu. Distributed: built on the meta device, then split
    into pipeline stages, materialised, tensor- and data-parallelised (parallel/)."""
    if pmesh is None:
        model = build_emu(config.model, device=device, seed=config.seed)
        apply_freezing(model, config.optimizer)
        if config.performance.fused_kernels:
            apply_fused_norms(model, device.type)
        apply_recompute_and_compile(model, config.performance)
        return ParallelModel([model])
    full = build_emu(config.model, device="meta")
    apply_freezing(full, config.optimizer)
    losses: list = []  # the pipeline's loss_fn records each micro-batch's (lm, l2) here
    pmodel = parallelize_emu(full, pmesh, n_micro, pipeline_loss_fn(losses, config), config.seed, config.performance)
    pmodel.losses = losses
    return pmodel


def build_parallel_optimizer(pmodel: ParallelModel, config: OptimizerConfig, fused: bool = False) -> torch.optim.AdamW:
    """One AdamW over every part (fused with --fused kernels on, else foreach); param groups
    keep Emu's names (module_family), split by device mesh (kernels.split_by_mesh)."""
    return build_parallel_adamw(pmodel.parts, config, fused)


# ---------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------
def pipeline_loss_fn(losses: list, config: TrainConfig):
    """The last stage's loss: the schedule calls it per micro-batch with the stage outputs."""
    special, vocab = config.model.special_tokens, config.model.llm.vocab_size

    def loss_fn(outputs, _index):
        logits, regression, targets, tokens, *documents = outputs  # document ids: packed rows
        loss = mixed_loss(logits, regression, targets, tokens, special, config.l2_loss_weight, vocab,
                          documents[0] if documents else None)
        losses.append((loss.lm.detach(), loss.l2.detach()))
        return loss.total

    return loss_fn


def forward_backward(pmodel: ParallelModel, microbatches: list[dict], config: TrainConfig, precision: Precision) -> None:
    """Gradients of the mean loss over the micro-batches, accumulated in .grad."""
    if pmodel.schedule is not None:
        with precision.autocast():
            pmodel.schedule.step(microbatches)  # grads scaled by 1/n inside
        return
    special, n, vocab = config.model.special_tokens, len(microbatches), config.model.llm.vocab_size
    for i, batch in enumerate(microbatches):
        gradient_sync(pmodel.parts, enabled=i == n - 1)  # DP reduces once, on the last one
        documents = batch.get("document_ids")  # packed rows
        with precision.autocast():
            out = pmodel.parts[0](batch["tokens"], batch["images"], documents)
            loss = mixed_loss(*out, batch["tokens"], special, config.l2_loss_weight, vocab, documents)
        precision.backward(loss.total / n)
        pmodel.losses.append((loss.lm.detach(), loss.l2.detach()))


def train_step(pmodel: ParallelModel, optimizer, microbatches: list[dict], config: TrainConfig,
               precision: Precision | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip by the global norm, one optimizer step."""
    precision = precision or Precision(config.performance, microbatches[0]["tokens"].device.type)
    optimizer.zero_grad(set_to_none=True)
    pmodel.losses.clear()
    tp = pmodel.pmesh.dims.tp if pmodel.pmesh is not None else 1
    # Vocab-parallel cross-entropy: forward and backward both run under loss_parallel.
    with loss_parallel() if tp > 1 else contextlib.nullcontext():
        forward_backward(pmodel, microbatches, config, precision)
    reduce_partial_grads(pmodel.parts, pmodel.pmesh)
    precision.unscale_(optimizer)  # fp16: true gradients before clipping
    grad_norm = clip_grad_norm_global(pmodel.parts, config.optimizer.clip_grad, pmodel.pmesh)
    precision.step(optimizer)  # fp16: skipped when gradients overflowed
    images = sum(batch["images"].shape[0] for batch in microbatches)
    rows = sum(batch["tokens"].shape[0] for batch in microbatches)
    lm, l2, images, rows = reduce_step_stats(pmodel, len(microbatches), images, rows)
    return StepResult(lm, l2, grad_norm, images, rows)


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


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def pretrain(config: TrainConfig) -> TrainSummary:
    world_size, device = init_distributed(config.device)
    dims = ParallelDims.from_config(config.parallel, world_size, config.model)
    n_micro = dims.validate(config.model, config.data)  # all sizes checked before any work
    pmesh = build_mesh(dims, device) if world_size > 1 else None
    if config.performance.fp16 and dims.pp > 1:
        raise ValueError("--fp16 loss scaling is not supported with pipeline parallelism; use --bf16")
    configure_attention(config.performance.attention_backend, device.type, config.performance.use_flash_attn)
    precision = Precision(config.performance, device.type)
    dp_rank = pmesh.dp_rank if pmesh is not None else 0
    torch.manual_seed(config.seed)
    tokenizer = prepare_caches(config, world_size)
    pmodel = build_model(config, pmesh, n_micro, device)
    optimizer = (build_adamw(pmodel.parts[0], config.optimizer, device.type, config.performance.fused_kernels)
                 if pmesh is None else build_parallel_optimizer(pmodel, config.optimizer, config.performance.fused_kernels))
    scheduler = LRScheduler(optimizer, config.optimizer, config.train_iters)
    build_loader = lambda consumed: build_pretrain_loader(  # noqa: E731
        config.data, tokenizer, dp_rank=dp_rank, dp_size=dims.dp, seed=config.seed,
        tokens_per_image=config.model.tokens_per_image, consumed_samples=consumed,
    )
    loader = build_loader(0)
    checkpointer = Checkpointer(config.checkpoint, config, Layout.from_mesh(pmesh))
    resumed = checkpointer.load(pmodel.parts, optimizer, scheduler, loader)
    if resumed.consumed_samples != loader.consumed_samples:  # saved at another DP size
        loader = build_loader(resumed.consumed_samples)
    start_iteration = resumed.iteration
    params = sum(p.numel() for _, p in pmodel.named_parameters())  # DTensor numel is the global size
    log.info("model %s: %.1fM parameters on this rank's stages, %s; %d micro-batches of %d per step per DP rank",
             config.preset, params / 1e6, device, n_micro, config.data.micro_batch_size)

    is_logger = world_size == 1 or dist.get_rank() == world_size - 1  # a last-stage rank
    summary = TrainSummary()
    bar = tqdm(total=config.train_iters, desc="pretrain", unit="it", disable=not (sys.stderr.isatty() and is_logger))
    last_log = time.perf_counter()
    for iteration in range(start_iteration, config.train_iters):
        microbatches = [move_batch(next(loader), device) for _ in range(n_micro)]
        lr = optimizer.param_groups[0]["lr"]
        result = train_step(pmodel, optimizer, microbatches, config, precision)
        scheduler.step(iteration + 1)
        summary.history.append((iteration + 1, result.lm_loss, result.l2_loss))
        bar.update(1)
        if (iteration + 1) % config.log_interval == 0 or iteration == 0:
            now = time.perf_counter()
            steps = 1 if iteration == 0 else config.log_interval
            elapsed = (now - last_log) / steps
            last_log = now
            stats = iteration_stats(config, iteration + 1, elapsed, lr, result, world_size)
            if is_logger:
                tqdm.write(stats.format(), file=sys.stdout)
        if checkpointer.should_save(iteration + 1):
            checkpointer.save(iteration + 1, pmodel.parts, optimizer, scheduler, loader, loader.consumed_samples)
        checkpointer.poll()
    bar.close()
    if config.checkpoint.save and start_iteration < config.train_iters and not checkpointer.should_save(config.train_iters):
        checkpointer.save(config.train_iters, pmodel.parts, optimizer, scheduler, loader, loader.consumed_samples)
    checkpointer.wait()
    if dims.pp == 1 and dims.tp == 1:
        held_out = [move_batch(next(loader), device) for _ in range(4)]  # never trained on
        summary.grounding = image_grounding(pmodel.parts[0], held_out, config.model.special_tokens)
    if is_logger:
        print(summary.format(), flush=True)
    # Never silent: what the sequence builder had to cut to fit --seq-length (this DP rank).
    log.info("data cut to fit --seq-length: %(dropped_images)d images dropped, "
             "%(truncated_tokens)d text tokens truncated", loader.totals)
    return summary


def iteration_stats(config: TrainConfig, iteration: int, seconds: float, lr: float, result: StepResult, devices: int = 1) -> IterationStats:
    d = config.data
    # Rows actually computed: the global batch, or fewer when samples are packed.
    tokens = result.sequences * d.seq_length
    perf = config.performance
    flops = training_flops(config.model, result.sequences, d.seq_length, result.images,
                           perf.recompute_granularity, perf.recompute_num_layers)
    return IterationStats(
        iteration=iteration,
        train_iters=config.train_iters,
        consumed_samples=iteration * d.global_batch_size,
        elapsed_ms=seconds * 1000,
        lr=lr,
        global_batch_size=d.global_batch_size,
        lm_loss=result.lm_loss,
        l2_loss=result.l2_loss,
        grad_norm=result.grad_norm,
        tokens_per_s=tokens / seconds,
        tflops_per_device=flops / seconds / 1e12 / devices,
    )
