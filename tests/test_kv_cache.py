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
