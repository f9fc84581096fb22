"""KV cache: incremental LLaMA steps equal full passes; cached image generation equals
the plain loop of 32 full passes it replaces."""

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.decoder.conditions import generate_embeddings, generation_prompt
from megatron_emu.model.emu import build_emu
from megatron_emu.model.kv_cache import KVCache

CONFIG = get_preset("tiny")


@torch.no_grad()
def test_incremental_steps_equal_one_full_pass():
    llm = build_emu(CONFIG, seed=0).llm
    h = torch.randn(2, 12, CONFIG.llm.hidden, generator=torch.Generator().manual_seed(0))
    full = llm.forward_layers(h)
    cache = KVCache()
    pieces = [llm.forward_layers(h[:, :7], cache=cache)] + [llm.forward_layers(h[:, i:i + 1], cache=cache)
                                                             for i in range(7, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_generation_equals_full_passes():
    emu = build_emu(CONFIG, seed=0)
    prompt = torch.tensor([generation_prompt([5, 9, 14, 3], 1, CONFIG.special_tokens)] * 2)
    inputs, reference = emu.embed(prompt, None), []
    for _ in range(CONFIG.causal_former.num_query_tokens):  # the loop the cache replaces
        step = emu.regression_head(emu.llm.norm(emu.llm.forward_layers(inputs))[:, -1:])
        reference.append(step)
        inputs = torch.cat([inputs, step], dim=1)
    torch.testing.assert_close(generate_embeddings(emu, prompt), torch.cat(reference, dim=1), rtol=1e-5, atol=1e-5)


def test_cache_past_max_positions_is_refused():
    llm = build_emu(CONFIG, seed=0).llm
    cache = KVCache()
    cache.length = CONFIG.llm.max_positions
    with pytest.raises(ValueError, match="exceeds max positions"):
        llm.forward_layers(torch.zeros(1, 1, CONFIG.llm.hidden), cache=cache)


@torch.no_grad()
def test_left_padded_rows_compute_what_they_compute_alone():
    """Row 1 is 7 tokens after 5 padding slots: positioned from 0, blind to the padding,
    in the prompt pass and in the cached steps after it; reorder() keeps rows whole."""
    llm = build_emu(CONFIG, seed=0).llm
    h = torch.randn(2, 14, CONFIG.llm.hidden, generator=torch.Generator().manual_seed(0))
    h[1, :5] = 1e3  # padding slots: any values must leave row 1 unchanged
    cache = KVCache(padding=torch.tensor([0, 5]))
    batched = torch.cat([llm.forward_layers(h[:, :12], cache=cache), llm.forward_layers(h[:, 12:13], cache=cache)], 1)
    cache.reorder(torch.tensor([1, 1]))  # as beam search does: row 1 twice
    step = llm.forward_layers(h[[1, 1], 13:14], cache=cache)
    torch.testing.assert_close(batched[0], llm.forward_layers(h[:1, :13])[0], rtol=1e-5, atol=1e-5)
    alone = llm.forward_layers(h[1:, 5:14])[0]  # (9, H)
    torch.testing.assert_close(batched[1, 5:], alone[:8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], alone[8:].expand(2, -1), rtol=1e-5, atol=1e-5)
