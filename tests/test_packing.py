"""Sequence packing: layout, document masks and positions, and exact equality with the
unpacked micro-batch (every packed sample is computed as if alone in its row)."""

import numpy as np
import pytest
import torch

from megatron_emu.config import LLaMAConfig, get_preset
from megatron_emu.data.packing import first_fit_decreasing, pad_rows
from megatron_emu.model import attention
from megatron_emu.model.attention import dense_document_mask, document_boundaries, set_attention_backend
from megatron_emu.model.emu import build_emu
from megatron_emu.model.llama import rotary_tables, token_positions
from megatron_emu.model.loss import emu_loss, regression_mask, text_labels
from tests.packed_samples import micro_batches, random_samples

CONFIG = get_preset("tiny")
SEQ = 128
# (text tokens, images) of 5 samples of 46, 77, 82, 40, 38 tokens -> 3 rows of 128, not 5.
SHAPES = [(10, 1), (75, 0), (12, 2), (38, 0), (2, 1)]


@pytest.fixture(autouse=True)
def restore_backend():
    saved = attention.get_attention_backend()
    yield
    set_attention_backend(saved)


def test_first_fit_decreasing():
    # longest first: 70 -> row 0, 50 -> row 1, 40 -> row 1, 30 -> row 0 (full), 20 -> row 2
    assert first_fit_decreasing([50, 30, 70, 20, 40], 100) == [[1, 2], [0, 4], [3]]
    with pytest.raises(ValueError, match="longer than --seq-length 100"):
        first_fit_decreasing([101], 100)


def test_packed_layout_keeps_every_sample_whole():
    samples = random_samples(CONFIG, SHAPES, seed=1)
    unpacked, packed = micro_batches(CONFIG, SEQ, SHAPES, seed=1)
    tokens, ids, pad = packed["tokens"], packed["document_ids"], CONFIG.special_tokens.pad
    assert tokens.shape == (3, SEQ) and unpacked["tokens"].shape == (5, SEQ)
    found, images_in_order = [], []
    for r in range(tokens.shape[0]):
        for d in ids[r].unique().tolist():
            doc = tokens[r][ids[r] == d].tolist()
            if all(t == pad for t in doc):
                assert d == ids[r].max(), "the trailing [PAD] is the row's last document"
                continue
            found.append(doc)
            match = next(s for s in samples if s.tokens == doc)
            images_in_order += match.images
    assert sorted(found) == sorted(s.tokens for s in samples)
    assert torch.equal(packed["images"], torch.from_numpy(np.stack(images_in_order)))
    assert packed["num_samples_by_kind"] == {"test": 5}
    assert torch.equal(packed["loss_mask"], (~torch.isin(tokens, torch.tensor(CONFIG.special_tokens.ignored_in_ce))).float())


def test_positions_restart_and_mask_stays_within_documents():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    table = rotary_tables(LLaMAConfig(hidden=8, heads=2), 16)  # head_dim 4
    positions = token_positions(table, 6, ids)
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    torch.testing.assert_close(positions.cos, table[0, expected].unsqueeze(1))
    allowed = dense_document_mask(ids)[1, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False]  # row 1, token 3: its document 0..3
    assert allowed[5].tolist() == [False, False, False, False, True, True]
    cu_seqlens, longest = document_boundaries(ids)
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4 and cu_seqlens.dtype == torch.int32


def test_no_target_crosses_a_document_boundary():
    s = CONFIG.special_tokens
    tokens = torch.tensor([[1, 7, 8, 2, 1, s.img_start, s.image]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    # EOS (position 3) would otherwise be trained to predict the next document's BOS.
    assert text_labels(tokens, s, ids).tolist() == [[7, 8, 2, -100, -100, -100]]
    assert text_labels(tokens, s).tolist() == [[7, 8, 2, 1, -100, -100]]
    # An (unrealistic) image cut at a document's end: its last slot regresses nothing.
    tokens = torch.tensor([[1, s.img_start, s.image, 1, s.img_start, s.image, s.image]])
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    assert regression_mask(tokens, s).tolist() == [[False, True, True, False, True, True]]
    assert regression_mask(tokens, s, ids).tolist() == [[False, True, False, False, True, True]]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    documents = batch.get("document_ids")
    out = model(batch["tokens"], batch["images"], documents)
    loss = emu_loss(*out, batch["tokens"], CONFIG.special_tokens, 1.0, CONFIG.llm.vocab_size, documents)
    loss.total.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_micro_batch_equals_unpacked(backend):
    set_attention_backend(backend)
    model = build_emu(CONFIG, seed=0)
    unpacked, packed = micro_batches(CONFIG, SEQ, SHAPES, seed=2)
    want, want_grads = loss_and_grads(model, unpacked)
    got, got_grads = loss_and_grads(model, packed)
    for key in ("lm", "l2"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    # [PAD] rows added for the pipeline change nothing either.
    padded, _ = loss_and_grads(model, pad_rows(packed, 5, CONFIG.special_tokens.pad))
    torch.testing.assert_close(padded.total, want.total, rtol=1e-5, atol=1e-6)


def test_without_the_mask_packing_would_leak():
    """The equality above is not vacuous: attending across documents changes the loss."""
    model = build_emu(CONFIG, seed=0)
    _, packed = micro_batches(CONFIG, SEQ, SHAPES, seed=2)
    masked, _ = loss_and_grads(model, packed)
    leaky, _ = loss_and_grads(model, {**packed, "document_ids": torch.zeros_like(packed["document_ids"])})
    assert abs(masked.lm.item() - leaky.lm.item()) > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() or not attention.backend_installed("flash"),
                    reason="flash-attn varlen needs CUDA and the flash-attn package")
def test_flash_varlen_equals_math():
    ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 100 + [1] * 28], device="cuda")
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    set_attention_backend("flash")
    documents = attention.document_mask(ids)
    assert documents.cu_seqlens is not None
    out = attention.scaled_dot_product_attention(q, k, v, causal=True, documents=documents)
    set_attention_backend("math")
    ref = attention.scaled_dot_product_attention(q.float(), k.float(), v.float(), causal=True,
                                                 documents=attention.document_mask(ids))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
