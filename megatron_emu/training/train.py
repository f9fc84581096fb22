"""The pretraining loop: build, then iterate over global batches, read top to bottom.

One optimizer step = one global batch = n micro-batches per data-parallel rank;
gradients accumulate over the micro-batches (loss / n each) and data-parallel ranks
reduce them once, after the last. With pipeline parallelism a schedule
(parallel/pipeline.py) runs the micro-batches instead of the plain loop.
The same code runs single-process, under torchrun and under srun.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
import math

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_emu.config import TrainConfig
from megatron_emu.data.blend import parse_split
from megatron_emu.data.loader import build_pretrain_loader, check_datasets, ensure_synthetic_corpus
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.parallel.mesh import ParallelMesh
from megatron_emu.training.build import Run, build_run
from megatron_emu.training.checkpoint import Checkpointer, Layout
from megatron_emu.training.checkpoint_files import iteration_dir
from megatron_emu.training.evaluate import image_grounding
from megatron_emu.training.failsafe import SkipTracker, check_save_before_training
from megatron_emu.training.signals import ExitConditions
from megatron_emu.training.pretrained import load_pretrained
from megatron_emu.training.instruct import check_instruct_run, init_new_chat_token_rows, merge_checkpoint
from megatron_emu.training.step import StepResult, train_step, validation_loss
from megatron_emu.training.metrics import IterationStats, training_flops
from megatron_emu.training.optim import LRScheduler
from megatron_emu.training.watch import TrainingMonitor

log = logging.getLogger("megatron_emu")


@dataclass
class TrainSummary:
    """What a run reports at the end; `history` holds (iteration, lm, l2) per step."""

    history: list[tuple[int, float, float]] = field(default_factory=list)
    validation: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, lm, l2)
    grounding: tuple[float, float] | None = None  # text CE with true / shuffled images
    grounding_data: str = "validation split"  # or the next training micro-batches (no valid split)
    exit_reason: str | None = None  # why the run stopped before --train-iters (saved, exit 0)
    checkpoint: str | None = None  # the final checkpoint's directory (with --save)

    def format(self, window: int = 10) -> str:
        if not self.history:  # e.g. resumed from a checkpoint at --train-iters
            return "summary: no iterations run (the run had already reached --train-iters)"
        if len(self.history) == 1:
            _, lm, l2 = self.history[0]
            text = f"summary: 1 iteration | lm loss {lm:.4f} | l2 loss {l2:.4f}"
        else:
            window = min(window, len(self.history) // 2)  # the two windows never overlap
            first, last = self.history[:window], self.history[-window:]
            mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
            text = (
                f"summary: {len(self.history)} iterations | "
                f"lm loss {mean(first, 1):.4f} -> {mean(last, 1):.4f} | "
                f"l2 loss {mean(first, 2):.4f} -> {mean(last, 2):.4f} "
                f"(means of the first and last {window} iterations)"
            )
        if self.grounding:
            text += (f"\ntext CE on the {self.grounding_data}: {self.grounding[0]:.4f} with the true images, "
                     f"{self.grounding[1]:.4f} with shuffled images")
        if self.checkpoint:
            text += f"\ncheckpoint: {self.checkpoint} (export, generate, resume: README \"After command 1\")"
        return text


def load_tokenizer(config: TrainConfig) -> EmuTokenizer:
    path = config.data.tokenizer_model or build_tiny_tokenizer(config.data.cache_dir or None)
    tokenizer = EmuTokenizer(path, config.model.llm.num_special_tokens)  # 6 with [USER] [ASSISTANT]
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
# The loop
# ---------------------------------------------------------------------------
def pretrain(config: TrainConfig) -> TrainSummary:
    check_datasets(config.data.data_path)  # every --data-path prefix exists, before any work
    check_instruct_run(config)
    run = build_run(config)  # training/build.py: layout (all sizes checked), kernels, model, optimizer
    try:
        return train_loop(config, run)
    finally:
        run.close()


def train_loop(config: TrainConfig, run: Run) -> TrainSummary:
    """The loop over global batches, on the model parts and optimizer `run` holds."""
    dims, pmesh, device, n_micro = run.dims, run.pmesh, run.device, run.n_micro
    pmodel, optimizer, precision = run.pmodel, run.optimizer, run.precision
    world_size = dims.world_size
    cpu_group = pmesh.new_gloo_group()  # checkpoint coordination, exit flags
    exits = ExitConditions(config.failsafe, cpu_group)  # signal handlers from here on
    dp_rank = pmesh.dp_rank
    tokenizer = prepare_caches(config, world_size)
    scheduler = LRScheduler(optimizer, config.optimizer, config.train_iters)
    if config.lora.merge:  # no data, no loop: base + adapters -> one full checkpoint
        merge_checkpoint(config, pmodel, optimizer, tokenizer)
        return TrainSummary()
    build_loader = lambda consumed, split="train": build_pretrain_loader(  # noqa: E731
        config.data, tokenizer, dp_rank=dp_rank, dp_size=dims.dp, seed=config.seed,
        tokens_per_image=config.model.tokens_per_image, consumed_samples=consumed, split=split,
    )
    loader = build_loader(0)
    valid = validation_batches(config, build_loader, n_micro)
    checkpointer = Checkpointer(config.checkpoint, config, Layout.from_mesh(pmesh), cpu_group)
    if config.lora.enabled and config.checkpoint.pretrained_checkpoint:
        load_pretrained(config.checkpoint.pretrained_checkpoint, pmodel.parts, dataclasses.asdict(config.model),
                        checkpointer.process_group)
    resumed = checkpointer.load(pmodel.parts, optimizer, scheduler, loader)
    if resumed.consumed_samples != loader.consumed_samples:  # saved at another DP size
        loader = build_loader(resumed.consumed_samples)
    start_iteration = resumed.iteration
    if config.checkpoint.save:  # found now, not at the first save after hours of work
        checkpointer.refuse_rewind(start_iteration, starting=True)
        check_save_before_training(config.checkpoint.save, pmodel.parts, optimizer, dims.dp * dims.tp,
                                   pmesh.rank, cpu_group)
    skips = SkipTracker(config.failsafe.max_skipped_iterations)
    if config.lora.enabled:  # from the (loaded) base's "user" / "assistant" rows
        init_new_chat_token_rows(pmodel.parts, tokenizer, config.checkpoint.pretrained_checkpoint)
    params = sum(p.numel() for _, p in pmodel.named_parameters())  # DTensor numel is the global size
    log.info("model %s: %.1fM parameters on this rank's stages, %s; %d micro-batches of %d per step per DP rank",
             config.preset, params / 1e6, device, n_micro, config.data.micro_batch_size)

    is_logger = pmesh.rank == world_size - 1  # a last-stage rank
    monitor = TrainingMonitor(config, pmesh, device, is_logger, start_iteration)
    timers = monitor.timers
    summary = TrainSummary()
    bar = tqdm(total=config.train_iters, desc="pretrain", unit="it", disable=not (sys.stderr.isatty() and is_logger))
    last_log = time.perf_counter()
    last = start_iteration  # the last iteration run
    try:  # the sinks closed here, not only at exit: an in-process caller may start another run
        for iteration in range(start_iteration, config.train_iters):
            with timers("data-loader-wait"):
                host_batches = [next(loader) for _ in range(n_micro)]
            with timers("batch-generator"):
                microbatches = [move_batch(b, device) for b in host_batches]
            lr = optimizer.param_groups[0]["lr"]
            result = train_step(pmodel, optimizer, microbatches, config, precision, timers)
            skips.record(iteration + 1, result.skipped, result.nonfinite)  # raises after too many in a row
            scheduler.step(iteration + 1)
            monitor.step(iteration + 1, lr, result, microbatches, loader)
            summary.history.append((iteration + 1, result.lm_loss, result.l2_loss))
            bar.update(1)
            if (iteration + 1) % config.log_interval == 0 or iteration == 0:
                now = time.perf_counter()
                steps = 1 if iteration == 0 else config.log_interval
                elapsed = (now - last_log) / steps
                last_log = now
                stats = iteration_stats(config, iteration + 1, elapsed, lr, result, world_size, skips.take_counts(),
                                        device.type)
                if is_logger:
                    tqdm.write(stats.format(), file=sys.stdout)
                monitor.log_line(stats)
            if valid and config.eval_interval and (iteration + 1) % config.eval_interval == 0:
                with timers("validation"):
                    lm, l2 = validation_loss(pmodel, [[move_batch(b, device) for b in step] for step in valid], config, precision)
                summary.validation.append((iteration + 1, lm, l2))
                monitor.validation(iteration + 1, lm, l2)
                if is_logger:
                    tqdm.write(format_validation(iteration + 1, lm, l2), file=sys.stdout)
            if checkpointer.should_save(iteration + 1):
                with timers("save-checkpoint"):
                    checkpointer.save(iteration + 1, pmodel.parts, optimizer, scheduler, loader, loader.consumed_samples)
            checkpointer.poll()
            monitor.end_of_iteration(iteration + 1)
            last = iteration + 1
            summary.exit_reason = exits.reason(last) if last < config.train_iters else None  # same on every rank
            if summary.exit_reason:
                break
    finally:
        bar.close()
        monitor.close()
    if config.checkpoint.save and last > start_iteration and not checkpointer.should_save(last):
        checkpointer.save(last, pmodel.parts, optimizer, scheduler, loader, loader.consumed_samples)
    checkpointer.wait()
    if config.checkpoint.save and last > start_iteration:
        summary.checkpoint = iteration_dir(config.checkpoint.save, last)
    if summary.exit_reason:
        saved = f"saved {config.checkpoint.save}" if config.checkpoint.save else "nothing saved (no --save)"
        log.info("stopping at iteration %d of %d: %s; %s", last, config.train_iters, summary.exit_reason, saved)
        return summary
    if dims.pp == 1 and dims.tp == 1 and not config.lora.enabled:  # conversations need not hold images
        # Held out: the validation split; without one, the training stream's next micro-batches
        # (not trained on in this run, though earlier epochs may have seen their samples).
        held_out = [b for step in valid for b in step] if valid else [next(loader) for _ in range(4)]
        summary.grounding_data = "validation split" if valid else "next training micro-batches"
        summary.grounding = image_grounding(pmodel.parts[0], [move_batch(b, device) for b in held_out],
                                            config.model.special_tokens)
    log_data_cut(config, data_cut_totals(loader, pmesh, device))  # before the summary: it ends the log
    if is_logger:
        print(summary.format(), flush=True)
    return summary


def data_cut_totals(loader, pmesh: ParallelMesh, device: torch.device) -> dict[str, int]:
    """What the sequence builder cut to fit --seq-length in this run, summed over DP ranks
    (a collective: every rank calls it)."""
    counts = torch.tensor([loader.totals["dropped_images"], loader.totals["truncated_tokens"]], device=device)
    if pmesh.dims.dp > 1:
        dist.all_reduce(counts, group=pmesh.dp_mesh.get_group())
    return {"dropped_images": int(counts[0]), "truncated_tokens": int(counts[1])}


def log_data_cut(config: TrainConfig, totals: dict[str, int]) -> None:
    """Never silent: what was cut, and why an image goes whole."""
    log.info("data cut to fit --seq-length: %(dropped_images)d images dropped, "
             "%(truncated_tokens)d text tokens truncated", totals)
    if totals["dropped_images"]:
        log.info("(an image is never cut: one that does not fit its sequence is dropped whole; a video's 8 "
                 "frames alone need 8 x %d tokens, so --seq-length %d keeps at most %d of them: a longer "
                 "--seq-length keeps more)", config.model.tokens_per_image, config.data.seq_length,
                 max(0, (config.data.seq_length - 2) // config.model.tokens_per_image))


def validation_batches(config: TrainConfig, build_loader, n_micro: int) -> list[list[dict]]:
    """The first --eval-iters global batches of the valid split (this DP rank's micro-batches),
    kept on the host: every validation scores the same samples, so the curve is comparable."""
    has_valid = parse_split(config.data.split)[1] > 0
    if config.eval_interval and not has_valid:
        raise ValueError(f"--eval-interval {config.eval_interval} needs validation samples: set --split "
                         f"(e.g. 969,30,1); the current split {config.data.split or '1,0,0'} has none")
    if not has_valid:
        return []
    loader = build_loader(0, "valid")
    return [[next(loader) for _ in range(n_micro)] for _ in range(max(config.eval_iters, 1))]


def format_validation(iteration: int, lm: float, l2: float) -> str:
    """Megatron's validation block."""
    line = (f" validation loss at iteration {iteration} | lm loss value: {lm:.6E} | "
            f"lm loss PPL: {math.exp(min(lm, 50.0)):.6E} | l2 loss value: {l2:.6E} |")
    rule = "-" * len(line)
    return f"{rule}\n{line}\n{rule}"


def iteration_stats(config: TrainConfig, iteration: int, seconds: float, lr: float, result: StepResult, devices: int = 1,
                    skipped: tuple[int, int] = (0, 0), device_type: str = "cuda") -> IterationStats:
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
        skipped_iterations=skipped[0],  # (skipped, nan) since the last log line
        nan_iterations=skipped[1],
        device_type=device_type,
    )
