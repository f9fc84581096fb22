"""The mixed objective follows spec section 4 exactly."""

import torch
import torch.nn.functional as F

from megatron_emu.config import get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss, regression_mask, text_labels
from tests.batches import random_batch

CONFIG = get_preset("tiny")
SPECIAL = CONFIG.special_tokens


def test_labels_are_ignored_exactly_at_pad_image_img_and_end_img():
    batch = random_batch(CONFIG, batch_size=2, seq_length=96)
    tokens = batch["tokens"]
    labels = text_labels(tokens, SPECIAL)
    next_tokens = tokens[:, 1:]
    special = torch.isin(next_tokens, torch.tensor([SPECIAL.pad, SPECIAL.image, SPECIAL.img_start, SPECIAL.img_end]))
    assert special.any() and (~special).any()
    assert (labels[special] == -100).all()
    assert torch.equal(labels[~special], next_tokens[~special])


def test_regression_predicts_33_positions_per_image_whose_targets_are_the_next_inputs():
    batch = random_batch(CONFIG, batch_size=2, seq_length=120, images_per_sample=2)
    tokens = batch["tokens"]
    mask = regression_mask(tokens, SPECIAL)
    assert int(mask.sum()) == 4 * 33
    # The targets of the masked positions are <image>_1..<image>_32, then [/IMG].
    targets = tokens[:, 1:][mask].view(4, 33)
    assert (targets[:, :32] == SPECIAL.image).all() and (targets[:, 32] == SPECIAL.img_end).all()


def test_loss_values_equal_a_direct_computation():
    batch = random_batch(CONFIG, batch_size=2, seq_length=96, seed=3)
    tokens = batch["tokens"]
    logits = torch.randn(2, 96, CONFIG.llm.vocab_size)
    regression = torch.randn(2, 96, CONFIG.llm.hidden)
    inputs = torch.randn(2, 96, CONFIG.llm.hidden)
    loss = emu_loss(logits, regression, inputs, tokens, SPECIAL, l2_weight=0.5)

    ce_terms, l2_terms = [], []
    for b in range(2):
        for s in range(95):
            label = int(tokens[b, s + 1])
            if label not in SPECIAL.ignored_in_ce:
                ce_terms.append(F.cross_entropy(logits[b, s][None], torch.tensor([label])))
            if int(tokens[b, s]) in (SPECIAL.img_start, SPECIAL.image):
                l2_terms.append(((regression[b, s] - inputs[b, s + 1]) ** 2).mean())
    torch.testing.assert_close(loss.lm, torch.stack(ce_terms).mean())
    torch.testing.assert_close(loss.l2, torch.stack(l2_terms).mean())
    torch.testing.assert_close(loss.total, loss.lm + 0.5 * loss.l2)


def test_regression_targets_carry_no_gradient():
    model = build_emu(CONFIG, seed=0)
    batch = random_batch(CONFIG, batch_size=1, seq_length=96)
    out = model(batch["tokens"], batch["images"])
    loss = emu_loss(*out, batch["tokens"], SPECIAL, l2_weight=1.0)
    # Gradients of l2 alone reach the regression head, but not through the target side:
    # the token embedding of [/IMG] (only ever a target, never a predicting input) gets none.
    model.zero_grad()
    loss.l2.backward()
    assert model.regression_head.weight.grad.abs().sum() > 0
    end_row = model.llm.tok_embeddings.weight.grad[SPECIAL.img_end]
    assert torch.count_nonzero(end_row) == 0


def test_a_batch_without_images_has_zero_l2_and_still_trains_text():
    model = build_emu(CONFIG, seed=0)
    tokens = torch.randint(3, SPECIAL.pad, (2, 40))
    out = model(tokens, None)
    loss = emu_loss(*out, tokens, SPECIAL)
    assert loss.l2.item() == 0.0 and loss.lm.item() > 0
    loss.total.backward()
