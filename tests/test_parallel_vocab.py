"""--make-vocab-size-divisible-by: padded embedding / LM-head rows, never predicted.

- Layout validation: emu-14b's 32004-token vocabulary blocks TP=8 until it is padded.
- Single process: a padded tiny model whose real rows equal an unpadded one's gives
  the same loss and gradients; its padded rows get no gradient.
- TP2 (2 gloo ranks): the vocab-parallel CE with the padded columns masked locally
  equals the plain CE over the real vocabulary, loss and logit gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel

from megatron_emu.arguments import parse_args
from megatron_emu.config import DataConfig, ParallelConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import cross_entropy_loss, emu_loss
from megatron_emu.parallel.loss import mixed_loss
from megatron_emu.parallel.mesh import ParallelDims
from tests.batches import random_batch
from tests.dist_utils import spawn


def padded(preset: str, multiple: int):
    model = get_preset(preset)
    return dataclasses.replace(model, llm=dataclasses.replace(model.llm, make_vocab_size_divisible_by=multiple))


def test_padded_vocab_size_and_flag():
    c = parse_args(["--preset", "emu-14b", "--make-vocab-size-divisible-by", "128"])
    assert (c.model.llm.vocab_size, c.model.llm.padded_vocab_size) == (32004, 32128)
    assert parse_args([]).model.llm.padded_vocab_size == 516  # default: unpadded (HF rows map 1:1)
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        parse_args(["--make-vocab-size-divisible-by", "0"])


def test_tp8_for_emu_14b_needs_padding():
    data = DataConfig(seq_length=2048, micro_batch_size=1, global_batch_size=16)
    parallel = ParallelConfig(tensor_model_parallel_size=8)
    plain = get_preset("emu-14b")
    with pytest.raises(ValueError, match="vocabulary size 32004 is not divisible.*--make-vocab-size-divisible-by"):
        ParallelDims.from_config(parallel, 16, plain).validate(plain, data)
    model = padded("emu-14b", 128)
    assert ParallelDims.from_config(parallel, 16, model).validate(model, data) == 8


def test_padded_rows_are_never_predicted():
    base = build_emu(get_preset("tiny"), seed=3)
    model = build_emu(padded("tiny", 128), seed=3)
    vocab = base.config.llm.vocab_size
    assert model.llm.output.weight.shape[0] == 640 and model.llm.tok_embeddings.weight.shape[0] == 640
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = dict(base.named_parameters())[name]
            p[: q.shape[0]].copy_(q)
            p[q.shape[0]:].normal_(std=5.0)  # large padded logits would show up in the CE
    batch = random_batch(base.config, 2, 80, 1, seed=5)
    special = base.config.special_tokens
    losses = []
    for m in (base, model):
        loss = emu_loss(*m(batch["tokens"], batch["images"]), batch["tokens"], special, vocab_size=vocab)
        loss.total.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1].total, losses[0].total, rtol=1e-6, atol=0)
    for name in ("llm.output.weight", "llm.tok_embeddings.weight"):
        got, want = dict(model.named_parameters())[name].grad, dict(base.named_parameters())[name].grad
        torch.testing.assert_close(got[:vocab], want, rtol=1e-5, atol=1e-7)
        assert got[vocab:].abs().max() == 0, f"{name}: padded rows got a gradient"
    # Without vocab_size the padded columns would take probability mass.
    unmasked = cross_entropy_loss(model(batch["tokens"], batch["images"]).logits, batch["tokens"], special)
    assert not torch.isclose(unmasked, losses[0].lm)


def vocab_parallel_worker(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    config = get_preset("tiny")
    special, vocab = config.special_tokens, config.llm.vocab_size
    batch = random_batch(config, 2, 80, 1, seed=9)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 80, 640, generator=g) * 3  # padded to 640 columns
    regression = torch.randn(2, 80, config.llm.hidden, generator=g)
    targets = torch.randn(2, 80, config.llm.hidden, generator=g)
    plain = logits.clone().requires_grad_()
    want = emu_loss(plain, regression, targets, batch["tokens"], special, vocab_size=vocab).lm
    want.backward()
    width = 640 // world
    local = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    sharded = DTensor.from_local(local, mesh, [Shard(-1)], run_check=False)
    h = config.llm.hidden // world
    reg = DTensor.from_local(regression[..., rank * h:(rank + 1) * h], mesh, [Shard(-1)], run_check=False)
    with loss_parallel():
        got = mixed_loss(sharded, reg, targets, batch["tokens"], special, vocab_size=vocab).lm
        got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(local.grad, plain.grad[..., rank * width:(rank + 1) * width], rtol=1e-5, atol=1e-8)
    if rank == world - 1:  # this rank holds the padded columns 516..639
        assert local.grad[..., vocab - rank * width:].abs().max() == 0


def test_vocab_parallel_ce_masks_padding():
    spawn(2, vocab_parallel_worker)
