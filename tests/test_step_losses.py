"""The step returns the loss terms of each micro-batch it computed, pipelined or not
(no list attached to the model after construction)."""

from __future__ import annotations

import math

from megatron_emu.config import DataConfig, OptimizerConfig, ParallelConfig, TrainConfig, get_preset
from megatron_emu.training.build import build_run
from megatron_emu.training.step import train_step
from tests.batches import random_batch
from tests.dist_utils import spawn

MICRO, SEQ = 2, 80


def config(**parallel) -> TrainConfig:
    return TrainConfig(preset="tiny", model=get_preset("tiny"), seed=7,
                       data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=MICRO),
                       optimizer=OptimizerConfig(lr=1e-3), parallel=ParallelConfig(**parallel))


def step_losses(cfg: TrainConfig):
    run = build_run(cfg)
    try:
        batches = [random_batch(cfg.model, 1, SEQ, 1, seed=m) for m in range(MICRO)]
        return run, train_step(run.pmodel, run.optimizer, batches, cfg)
    finally:
        run.close()


def check_means(result, n: int) -> None:
    assert len(result.microbatch_losses) == n
    lm = sum(l for l, _ in result.microbatch_losses) / n
    l2 = sum(r for _, r in result.microbatch_losses) / n
    assert math.isclose(lm, result.lm_loss, rel_tol=1e-6) and math.isclose(l2, result.l2_loss, rel_tol=1e-6)


def test_one_process_returns_each_micro_batch_loss():
    _, result = step_losses(config())
    check_means(result, MICRO)


def pipelined(rank: int, world: int) -> None:
    run, result = step_losses(config(pipeline_model_parallel_size=2))
    # The last stage computes every micro-batch's loss, the first stage none; the step's
    # means are all-reduced, so both ranks report the same step loss.
    if run.pmodel.computes_loss:
        check_means(result, MICRO)
    else:
        assert result.microbatch_losses == [], (rank, result)


def test_pipeline_returns_each_micro_batch_loss_from_the_last_stage():
    spawn(2, pipelined)
