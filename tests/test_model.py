"""The model matches the spec: shapes, parameter counts, causality, splice, input checks."""

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.model.causal_former import relative_position_bucket
from megatron_emu.model.emu import build_emu
from tests.batches import random_batch


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny")
    return config, build_emu(config, seed=0)


def emu14b_closed_form_counts() -> dict[str, int]:
    """Parameter counts written out from EMU_SPEC.md sections 1-3."""
    W, L, M, P = 1408, 40, 6144, 14
    eva_block = 2 * 2 * W + (3 * W * W + 2 * W) + (W * W + W) + (W * M + M) + (M * W + W)
    eva = (3 * P * P * W + W) + W + 257 * W + L * eva_block
    d, heads, hd, ffn, visual = 768, 12, 64, 3072, 1408
    inner = heads * hd
    # norms + self-attn q,k,v,o + cross-attn q,o + cross-attn k,v (from the 1408-wide image) + FFN
    cformer_block = 3 * d + 4 * d * inner + 2 * d * inner + 2 * visual * inner + 2 * d * ffn
    cformer = 32 * d + 32 * heads + 12 * cformer_block + d + (d * 5120 + 5120)
    H, F, V = 5120, 13824, 32004
    llama_layer = 4 * H * H + 3 * H * F + 2 * H
    llama = V * H + 40 * llama_layer + H + H * V
    return {"visual": eva, "ln_visual": 2 * W, "causal_former": cformer, "llm": llama, "regression_head": H * H}


def test_emu_14b_parameter_counts_match_the_spec():
    model = build_emu(get_preset("emu-14b"), device="meta")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    assert counts == emu14b_closed_form_counts()
    # The spec's '~0.2B' Causal Former is t5-base's size; its decoder shapes alone give 0.13B.
    assert 0.12e9 < counts["causal_former"] < 0.2e9
    assert 0.95e9 < counts["visual"] < 1.05e9  # EVA-CLIP-g ~1.0B
    assert 12.9e9 < counts["llm"] < 13.1e9  # LLaMA-13B (+4 added rows in both embeddings)
    assert counts["regression_head"] == 5120 * 5120  # 26M
    assert 14.0e9 < sum(counts.values()) < 14.4e9  # ~14B


@pytest.mark.parametrize("preset", ["tiny", "1b", "emu-14b"])
def test_every_preset_builds_with_the_spec_structure(preset):
    config = get_preset(preset)
    model = build_emu(config, device="meta")
    assert model.causal_former.query_embeds.shape == (1, 32, config.causal_former.d_model)
    assert model.visual.pos_embed.shape == (1, config.vision.num_tokens, config.vision.width)
    assert model.causal_former.proj.bias is not None
    assert model.llm.output.weight.shape == (config.llm.vocab_size, config.llm.hidden)
    assert model.llm.output.weight is not model.llm.tok_embeddings.weight  # untied
    assert config.llm.vocab_size == config.llm.base_vocab_size + 4


def test_emu_14b_special_token_ids_are_the_spec_ids():
    special = get_preset("emu-14b").special_tokens
    assert (special.pad, special.img_start, special.img_end, special.image) == (32000, 32001, 32002, 32003)
    assert (special.user, special.assistant) == (32004, 32005)


def test_output_shapes(tiny):
    config, model = tiny
    batch = random_batch(config, batch_size=2, seq_length=96)
    out = model(batch["tokens"], batch["images"])
    assert out.logits.shape == (2, 96, config.llm.vocab_size)
    assert out.regression.shape == (2, 96, config.llm.hidden)
    assert not out.inputs.requires_grad
    assert model.encode_images(batch["images"]).shape == (2, 32, config.llm.hidden)


def test_changing_a_later_token_never_changes_earlier_outputs(tiny):
    config, model = tiny
    batch = random_batch(config, batch_size=1, seq_length=96)
    tokens = batch["tokens"].clone()
    base = model(tokens, batch["images"]).logits
    tokens[0, 80] = (tokens[0, 80] + 1) % config.llm.base_vocab_size
    changed = model(tokens, batch["images"]).logits
    torch.testing.assert_close(changed[:, :80], base[:, :80], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 80:], base[:, 80:])


def test_splice_puts_image_i_at_image_i_positions(tiny):
    config, model = tiny
    batch = random_batch(config, batch_size=2, seq_length=120, images_per_sample=2)  # 4 images
    inputs = model.embed(batch["tokens"], batch["images"])
    visual = model.encode_images(batch["images"])  # (4, 32, H)
    slots = (batch["tokens"] == config.special_tokens.image).nonzero()  # row-major (b, s)
    for i in range(4):
        rows = slots[32 * i : 32 * (i + 1)]
        torch.testing.assert_close(inputs[rows[:, 0], rows[:, 1]], visual[i])
    text = batch["tokens"] != config.special_tokens.image
    torch.testing.assert_close(inputs[text], model.llm.tok_embeddings(batch["tokens"])[text])


def test_causal_former_query_i_ignores_later_queries():
    config = get_preset("tiny")
    former = build_emu(config, seed=1).causal_former
    visual = torch.randn(1, config.vision.num_tokens, config.vision.width)
    former.eval()
    base = former(visual)
    # Perturb query 20's learned embedding: outputs 0..19 must not move.
    with torch.no_grad():
        former.query_embeds[0, 20] += 1.0
    moved = former(visual)
    torch.testing.assert_close(moved[:, :20], base[:, :20], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 20:], base[:, 20:])


def test_t5_relative_buckets_are_unidirectional_and_log_spaced():
    relative = torch.tensor([0, -1, -15, -16, -127, -128, -1000, 5])  # key - query
    buckets = relative_position_bucket(relative, num_buckets=32, max_distance=128)
    assert buckets.tolist()[:3] == [0, 1, 15]  # exact near buckets
    assert 16 <= buckets[3] < buckets[4] <= 31  # log-spaced far buckets
    assert buckets[5] == buckets[6] == 31  # clamped beyond max distance
    assert buckets[7] == 0  # the future shares bucket 0 (masked anyway)


def test_vision_uses_features_before_any_final_norm(tiny):
    _, model = tiny
    assert not hasattr(model.visual, "norm") and not hasattr(model.visual, "fc_norm")
    assert model.visual.blocks[0].attn.k_proj.bias is None  # k has no bias
    assert model.visual.blocks[0].attn.q_proj.bias is not None and model.visual.blocks[0].attn.v_proj.bias is not None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b, s: b.update(images=b["images"][:1]), "1 images were given"),
        (lambda b, s: b["tokens"].__setitem__((0, 3), 10**6), "outside the vocabulary"),
        (lambda b, s: b.update(images=torch.zeros(2, 3, 64, 64, dtype=torch.uint8)), "images must be (N, 3, 224, 224)"),
    ],
    ids=["image-count-mismatch", "token-out-of-vocab", "wrong-image-size"],
)
def test_bad_inputs_raise_a_clear_value_error(tiny, mutate, message):
    config, model = tiny
    batch = random_batch(config, batch_size=2, seq_length=96)
    mutate(batch, config.special_tokens)
    with pytest.raises(ValueError) as error:
        model(batch["tokens"], batch["images"])
    assert message in str(error.value)
