"""Packed micro-batches under tensor + sequence + pipeline parallelism equal the
single-process run on the same samples unpacked (CPU, gloo, tiny, fp32).

The pipeline carries the document ids between stages and pads each step's micro-batches
to one row count; SP shards the packed rows along the sequence. The reference computes
every sample alone in its own row, so equality also proves no leak across documents.
"""

from __future__ import annotations

import math

import torch

from megatron_emu.config import DataConfig, OptimizerConfig, ParallelConfig, TrainConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.training.train import train_step
from tests.dist_utils import spawn
from tests.packed_samples import micro_batches
from tests.test_parallel_parity import build_run

STEPS, MICRO, SAMPLES, SEQ, SEED = 2, 2, 4, 128, 11
# Packed rows run masked attention where the reference runs is_causal: the float
# reductions differ (the loosening of tests/test_packing.py's single-process check).
# Gradients are compared at the first step: Adam turns last-bit differences in
# near-zero gradients into whole-step differences of those weights afterwards.
RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-5
# (text tokens, images) per sample; micro-batches pack into different row counts.
SHAPES = [[(10, 1), (75, 0), (12, 2), (38, 0)], [(80, 1), (60, 0), (20, 1), (7, 1)]]  # 2 and 3 rows


def run_config(**parallel) -> TrainConfig:
    return TrainConfig(preset="tiny", model=get_preset("tiny"), seed=SEED,
                       data=DataConfig(seq_length=SEQ, micro_batch_size=SAMPLES, global_batch_size=MICRO * SAMPLES,
                                       pack_sequences=True),
                       optimizer=OptimizerConfig(lr=1e-3, lr_decay_style="constant", weight_decay=0.01, clip_grad=1.0),
                       parallel=ParallelConfig(**parallel))


def step_batches(config: TrainConfig, packed: bool) -> list[list[dict]]:
    pick = 1 if packed else 0
    return [[micro_batches(config.model, SEQ, SHAPES[m], seed=10 * s + m)[pick] for m in range(MICRO)]
            for s in range(STEPS)]


def reference(config: TrainConfig) -> list[dict]:
    """Single process, unpacked: one sample per row, no document ids."""
    model = build_emu(config.model, seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    history = []
    for batches in step_batches(config, packed=False):
        optimizer.zero_grad(set_to_none=True)
        lm = 0.0
        for b in batches:
            loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], config.model.special_tokens)
            (loss.total / len(batches)).backward()
            lm += loss.lm.item() / len(batches)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        history.append(dict(lm=lm, grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history


def check_packed_layout(rank: int, world: int, name: str, parallel: dict, ref: list[dict]) -> None:
    config, pmodel, optimizer, pmesh, n_micro = build_run(world, parallel, run_config)
    for step, batches in enumerate(step_batches(config, packed=True)):
        assert len({b["tokens"].shape[0] for b in batches}) > 1, "the micro-batches should differ in rows"
        mine = batches[pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]  # this DP rank's share
        result = train_step(pmodel, optimizer, mine, config)
        assert math.isclose(result.lm_loss, ref[step]["lm"], rel_tol=RTOL), f"{name} step {step}: {result.lm_loss}"
        for pname, param in pmodel.named_parameters() if step == 0 else ():
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            want = ref[step]["grads"][pname]
            torch.testing.assert_close(grad, want, rtol=GRAD_RTOL, atol=GRAD_ATOL * want.abs().max().item(),
                                       msg=lambda m: f"{name} step {step} grad {pname}: {m}")


LAYOUTS = {
    "TP2+SP xPP2 1F1B": dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2),
    # DP ranks hold packed micro-batches of different row counts.
    "TP2+SP xDP2 FSDP2": dict(tensor_model_parallel_size=2, sequence_parallel=True, data_parallel_sharding="fsdp"),
}


def worker(rank: int, world: int, ref: list[dict]) -> None:
    for name, parallel in LAYOUTS.items():
        check_packed_layout(rank, world, name, parallel, ref)


def test_packed_tp_sp_pp_equals_unpacked_single_process():
    spawn(4, worker, reference(run_config()))
