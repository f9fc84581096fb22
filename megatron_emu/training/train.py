"""The pretraining loop: build, then iterate over global batches, read top to bottom.

One optimizer step = one global batch = `num_microbatches` micro-batches per
data-parallel rank; gradients accumulate over the micro-batches (loss / n each).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from megatron_emu.config import TrainConfig
from megatron_emu.data.loader import build_pretrain_loader
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.model.emu import Emu, build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.training.metrics import IterationStats, training_flops
from megatron_emu.training.optim import LRScheduler, apply_freezing, build_optimizer

log = logging.getLogger("megatron_emu")


@dataclass
class StepResult:
    lm_loss: float
    l2_loss: float
    grad_norm: float
    images: int  # images encoded in this step (for FLOPs)


@dataclass
class TrainSummary:
    """What a run reports at the end; `history` holds (iteration, lm, l2) per step."""

    history: list[tuple[int, float, float]] = field(default_factory=list)

    def format(self, window: int = 10) -> str:
        first, last = self.history[:window], self.history[-window:]
        mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
        return (
            f"summary: {len(self.history)} iterations | "
            f"lm loss {mean(first, 1):.4f} -> {mean(last, 1):.4f} | "
            f"l2 loss {mean(first, 2):.4f} -> {mean(last, 2):.4f} "
            f"(means of the first and last {min(window, len(self.history))} iterations)"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    return torch.device(name)


def num_microbatches(config: TrainConfig, dp_size: int = 1) -> int:
    d = config.data
    if d.global_batch_size % (d.micro_batch_size * dp_size):
        raise ValueError(
            f"--global-batch-size {d.global_batch_size} is not divisible by "
            f"--micro-batch-size {d.micro_batch_size} x data-parallel size {dp_size}"
        )
    return d.global_batch_size // (d.micro_batch_size * dp_size)


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


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model: Emu, optimizer, microbatches: list[dict], config: TrainConfig) -> StepResult:
    """Forward/backward every micro-batch, clip by global norm, one optimizer step."""
    special = config.model.special_tokens
    optimizer.zero_grad(set_to_none=True)
    lm_sum = l2_sum = 0.0
    images = 0
    for batch in microbatches:
        out = model(batch["tokens"], batch["images"])
        loss = emu_loss(*out, batch["tokens"], special, config.l2_loss_weight)
        (loss.total / len(microbatches)).backward()
        lm_sum += loss.lm.item()
        l2_sum += loss.l2.item()
        images += batch["images"].shape[0]
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = config.optimizer.clip_grad if config.optimizer.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    optimizer.step()
    n = len(microbatches)
    return StepResult(lm_sum / n, l2_sum / n, grad_norm, images)


def pretrain(config: TrainConfig) -> TrainSummary:
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config)
    model = build_emu(config.model, device=device, seed=config.seed)
    apply_freezing(model, config.optimizer)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = LRScheduler(optimizer, config.optimizer, config.train_iters)
    n_micro = num_microbatches(config)
    loader = iter(
        build_pretrain_loader(
            config.data, tokenizer, dp_rank=0, dp_size=1, seed=config.seed, tokens_per_image=config.model.tokens_per_image
        )
    )
    log.info("model %s: %.1fM parameters on %s; %d micro-batches of %d per step",
             config.preset, sum(p.numel() for p in model.parameters()) / 1e6, device, n_micro,
             config.data.micro_batch_size)

    summary = TrainSummary()
    bar = tqdm(total=config.train_iters, desc="pretrain", unit="it", disable=not sys.stderr.isatty())
    last_log = time.perf_counter()
    for iteration in range(config.train_iters):
        microbatches = [move_batch(next(loader), device) for _ in range(n_micro)]
        lr = optimizer.param_groups[0]["lr"]
        result = train_step(model, optimizer, microbatches, config)
        scheduler.step(iteration + 1)
        summary.history.append((iteration + 1, result.lm_loss, result.l2_loss))
        bar.update(1)
        if (iteration + 1) % config.log_interval == 0 or iteration == 0:
            now = time.perf_counter()
            steps = 1 if iteration == 0 else config.log_interval
            elapsed = (now - last_log) / steps
            last_log = now
            stats = iteration_stats(config, iteration + 1, elapsed, lr, result)
            tqdm.write(stats.format(), file=sys.stdout)
    bar.close()
    print(summary.format(), flush=True)
    return summary


def iteration_stats(config: TrainConfig, iteration: int, seconds: float, lr: float, result: StepResult) -> IterationStats:
    d = config.data
    tokens = d.global_batch_size * d.seq_length
    flops = training_flops(config.model, d.global_batch_size, d.seq_length, result.images)
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
        tflops_per_device=flops / seconds / 1e12,
    )
