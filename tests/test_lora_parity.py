"""LoRA under parallelism == single process (CPU, gloo, tiny, fp32, rtol 1e-5).

The adapters of q, k, v (column-parallel base: A replicated, B split by rows) and of o
(row-parallel base: A split by columns, B replicated) under TP2 + sequence parallel, and
under DP2 FSDP2 and PP2 (the last stage reads the answer mask from the step's micro-batch
feed): the answer-only loss and every adapter gradient of each step equal the
plainly written single-process reference; the frozen base never receives a gradient.
Two steps: at step 1 B = 0 (only B learns); at step 2 both A and B have gradients.
Adam's eps is large here: with the default 1e-6 every entry moves by ~lr whatever its
gradient, so a near-zero gradient's summation-order noise would become an O(lr) change
of B; a large eps keeps the update proportional to the gradient, the noise at roundoff.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.config import (
    NUM_INSTRUCT_SPECIAL_TOKENS, DataConfig, LoRAConfig, OptimizerConfig, ParallelConfig, PerformanceConfig,
    TrainConfig, get_preset,
)
from megatron_emu.model.emu import build_emu
from megatron_emu.model.init import init_parameters
from megatron_emu.model.lora import LoRASpec, apply_lora, is_lora_parameter
from megatron_emu.model.loss import emu_loss
from megatron_emu.training.build import build_run
from megatron_emu.training.optim import build_optimizer
from megatron_emu.training.step import train_step
from tests.batches import random_batch
from tests.dist_utils import spawn

STEPS, MICRO, SEQ, SEED, RTOL = 2, 2, 80, 7, 1e-5
ATOL = 1e-5  # of each tensor's largest entry, as tests/test_parallel_parity.py
SPEC = LoRASpec(rank=8, alpha=16.0)


def run_config(performance: dict | None = None, **parallel) -> TrainConfig:
    model = get_preset("tiny")
    model.llm.num_special_tokens = NUM_INSTRUCT_SPECIAL_TOKENS
    return TrainConfig(performance=PerformanceConfig(**{"fused_kernels": False, **(performance or {})}), preset="tiny",
                       model=model,
                       data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=MICRO),
                       optimizer=OptimizerConfig(lr=1e-2, lr_decay_style="constant", weight_decay=0.0, clip_grad=1.0,
                                                 adam_eps=1e-2),
                       parallel=ParallelConfig(**parallel), lora=LoRAConfig(SPEC.rank, SPEC.alpha), seed=SEED)


def step_batches(config: TrainConfig) -> list[list[dict]]:
    """Random micro-batches whose last 30 tokens are the 'answer' (the rest: prompt, image)."""
    out = []
    for s in range(STEPS):
        step = []
        for m in range(MICRO):
            b = random_batch(config.model, 1, SEQ, 1, seed=100 * s + m)
            b["answer_mask"] = torch.zeros(b["tokens"].shape)
            b["answer_mask"][:, SEQ - 30:] = 1.0
            step.append(b)
        out.append(step)
    return out


def reference(config: TrainConfig) -> list[dict]:
    model = build_emu(config.model, seed=SEED)
    init_parameters(model, config.model.init_std, SEED, set(apply_lora(model, SPEC)))
    optimizer = build_optimizer(model, config.optimizer)
    history = []
    for batches in step_batches(config):
        optimizer.zero_grad(set_to_none=True)
        lm = 0.0
        for b in batches:
            loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], config.model.special_tokens,
                            vocab_size=config.model.llm.vocab_size, answer_mask=b["answer_mask"])
            (loss.total / len(batches)).backward()
            lm += loss.lm.item() / len(batches)
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0).item()
        history.append(dict(lm=lm, norm=norm, grads={n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}))
        optimizer.step()
    return history


def check_layout(rank: int, world: int, name: str, parallel: dict, ref: list[dict]) -> None:
    config = run_config(**parallel)
    run = build_run(config)  # as pretraining builds it (training/build.py)
    pmodel, optimizer, pmesh, n_micro = run.pmodel, run.optimizer, run.pmesh, run.n_micro
    for step, batches in enumerate(step_batches(config)):
        mine = batches[pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]
        result = train_step(pmodel, optimizer, mine, config)
        expect = ref[step]
        assert math.isclose(result.lm_loss, expect["lm"], rel_tol=RTOL), f"{name} step {step}: {result.lm_loss} vs {expect['lm']}"
        assert math.isclose(result.grad_norm, expect["norm"], rel_tol=RTOL), f"{name} step {step} norm"
        compared = set()  # with PP, each rank holds its stage's adapters
        for pname, param in pmodel.named_parameters():
            if not is_lora_parameter(pname):
                assert param.grad is None, f"{name}: frozen {pname} got a gradient"
                continue
            got = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            want = expect["grads"][pname]
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * max(want.abs().max().item(), 1e-12),
                                       msg=lambda m: f"{name} step {step} {pname}: {m}")
            compared.add(pname)
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, sorted(compared))
        assert set().union(*map(set, everyone)) == set(expect["grads"]), f"{name}: adapters not compared"
        if step == 1:
            assert all(expect["grads"][n].abs().max() > 0 for n in compared if n.endswith("lora_A"))


LAYOUTS = {
    "TP2+SP": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "TP2": dict(tensor_model_parallel_size=2),
    "DP2 FSDP2": dict(data_parallel_sharding="fsdp"),
    "TP2+SP + selective recompute, fused kernels": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                                         performance=dict(recompute_granularity="selective",
                                                                          fused_kernels=True)),
    "DP2 FSDP2 + full recompute": dict(data_parallel_sharding="fsdp", performance=dict(recompute_granularity="full")),
    "PP2 1F1B": dict(pipeline_model_parallel_size=2),
}


def worker(rank: int, world: int, ref: list[dict]) -> None:
    for name, parallel in LAYOUTS.items():
        check_layout(rank, world, name, parallel, ref)


def test_lora_two_ranks_equal_single_process():
    spawn(2, worker, reference(run_config()))


DROPOUT_SPEC = LoRASpec(rank=8, alpha=16.0, dropout=0.25)


def dropout_config(**parallel) -> TrainConfig:
    config = run_config(**parallel)
    return dataclasses.replace(config, lora=LoRAConfig(DROPOUT_SPEC.rank, DROPOUT_SPEC.alpha, DROPOUT_SPEC.dropout))


def with_trained_b(named_parameters) -> None:
    """B = 0 at init would hide A's mask from the gradients: give B values (the same full
    tensor everywhere, sharded where the run shards it)."""
    for name, param in named_parameters:
        if name.endswith("lora_B"):
            full = torch.nn.init.normal_(torch.empty(param.shape), std=0.02, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements) if isinstance(param, DTensor)
                            else full)


def dropout_reference(config: TrainConfig) -> dict:
    """The clipped adapter gradients of one step, masks drawn from the stream seeded 1000."""
    model = build_emu(config.model, seed=SEED)
    init_parameters(model, config.model.init_std, SEED, set(apply_lora(model, DROPOUT_SPEC)))
    with_trained_b(model.named_parameters())
    torch.manual_seed(1000)
    batches = step_batches(config)[0]
    for b in batches:
        loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], config.model.special_tokens,
                        vocab_size=config.model.llm.vocab_size, answer_mask=b["answer_mask"])
        (loss.total / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def dropout_worker(rank: int, world: int, ref: dict) -> None:
    for name, parallel in {"TP2": dict(tensor_model_parallel_size=2),
                           "TP2+SP": dict(tensor_model_parallel_size=2, sequence_parallel=True)}.items():
        config = dropout_config(**parallel)
        run = build_run(config)
        with_trained_b(run.pmodel.named_parameters())
        torch.manual_seed(1000)  # every rank: the same stream as the reference
        train_step(run.pmodel, run.optimizer, step_batches(config)[0], config)
        compared = 0
        for pname, param in run.pmodel.named_parameters():
            if is_lora_parameter(pname):
                got = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
                want = ref[pname]
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * max(want.abs().max().item(), 1e-12),
                                           msg=lambda m: f"{name} {pname}: {m}")
                compared += 1
        assert compared == len(ref) and all(ref[n].abs().max() > 0 for n in ref)
        run.close()


def test_lora_dropout_masks_under_tp_are_the_single_process_masks():
    """--lora-dropout under TP (+SP): each adapter's input, replicated or split over heads,
    is dropped with the mask one process draws for the whole tensor (GlobalMaskDropout)."""
    spawn(2, dropout_worker, dropout_reference(dropout_config()))
