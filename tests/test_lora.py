"""LoRA on the LLM's q, k, v, o (model/lora.py) and the [USER] / [ASSISTANT] rows."""

import pytest
import torch

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS, get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.model.emu import build_emu
from megatron_emu.model.init import init_parameters
from megatron_emu.model.lora import LoRASpec, apply_lora, is_lora_parameter, merge_lora
from megatron_emu.model.loss import emu_loss
from megatron_emu.training.instruct import init_chat_token_rows


def instruct_preset():
    config = get_preset("tiny")
    config.llm.num_special_tokens = NUM_INSTRUCT_SPECIAL_TOKENS
    return config


def adapted(seed=0, spec=LoRASpec(16, 16.0)):
    model = build_emu(instruct_preset(), seed=seed)
    names = apply_lora(model, spec)
    init_parameters(model, model.config.init_std, seed, set(names))
    return model, names


def batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.llm.base_vocab_size, (2, 24), generator=g)


def test_adapters_only_on_attention_projections_and_base_frozen():
    model, names = adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(names)
    layers = model.config.llm.layers
    assert len(names) == layers * 4 * 2  # q, k, v, o x (A, B)
    assert all(".attention.w" in n and is_lora_parameter(n) for n in names)
    assert not any(n.startswith(("visual", "causal_former")) for n in names)
    # Base names are unchanged: plans, checkpoints and converters see the same model.
    assert "llm.layers.0.attention.wq.weight" in dict(model.named_parameters())


def test_starts_as_the_base_model_and_merge_is_exact():
    base = build_emu(instruct_preset(), seed=0)
    model, names = adapted()
    tokens = batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base(tokens).logits)  # B = 0
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        adapted_logits = model(tokens).logits
        assert not torch.allclose(adapted_logits, base(tokens).logits)
        assert merge_lora(model) == model.config.llm.layers * 4
        assert not any(is_lora_parameter(n) for n, _ in model.named_parameters())
        torch.testing.assert_close(model(tokens).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_rank():
    model, _ = adapted(spec=LoRASpec(4, 16.0))
    assert model.llm.layers["0"].attention.wq.lora.scaling == 4.0


def test_chat_rows_start_from_the_words_user_and_assistant(tmp_path):
    tok = EmuTokenizer(build_tiny_tokenizer(str(tmp_path)), NUM_INSTRUCT_SPECIAL_TOKENS)
    model, _ = adapted()
    init_chat_token_rows([model], tok)
    emb, head = model.llm.tok_embeddings.weight, model.llm.output.weight
    for row, word in ((tok.special.user, "user"), (tok.special.assistant, "assistant")):
        pieces = tok.sp.encode(word)
        torch.testing.assert_close(emb[row], emb[pieces].mean(0))
        torch.testing.assert_close(head[row], head[pieces].mean(0))


def test_bad_lora_flags_are_one_line_errors():
    from megatron_emu.arguments import parse_args

    with pytest.raises(ValueError, match="--lora-dropout"):
        parse_args(["--lora-rank", "16", "--lora-dropout", "1.5"])


def test_missing_pretrained_checkpoint_and_merge_without_rank_are_one_line_errors(tmp_path):
    from megatron_emu.arguments import parse_args
    from megatron_emu.training.pretrained import resolve_pretrained

    with pytest.raises(ValueError, match=f"--pretrained-checkpoint {tmp_path}: no checkpoint"):
        resolve_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="--lora-merge needs"):
        parse_args(["--lora-merge"])


def test_recompute_replays_the_lora_dropout_mask():
    """--lora-dropout with --recompute-*: the recomputed forward must draw the mask of the first
    forward, else the adapters get the gradient of another network."""
    from megatron_emu.parallel.activation_checkpoint import checkpoint_block
    from tests.batches import random_batch

    grads = []
    for recompute in (None, "full", "selective"):
        model, names = adapted(spec=LoRASpec(8, 16.0, dropout=0.5))
        for name in names:  # B = 0 at init would make A's gradient zero: give B values
            if name.endswith("lora_B"):
                torch.nn.init.normal_(model.get_parameter(name), std=0.02, generator=torch.Generator().manual_seed(1))
        if recompute:
            for block in model.llm.layers.values():
                checkpoint_block(block, selective=recompute == "selective")
        b = random_batch(model.config, 2, 48, 1, seed=3)
        torch.manual_seed(11)
        loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], model.config.special_tokens,
                        vocab_size=model.config.llm.vocab_size)
        loss.total.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys() and len(other) > 0
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
