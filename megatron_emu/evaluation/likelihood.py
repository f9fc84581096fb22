"""How likely the model finds each candidate continuation of a prompt (VisDial's 100 answer
options, NExT-QA's 5, VizWiz's yes / no): the mean log-probability of its tokens.

The prompt runs once; its KV cache is repeated for a chunk of candidates, which then run
together, right-padded (a causal model's earlier positions never see the padding after them).
The mean over tokens, not the sum, so long options are not penalised for their length.
"""

from __future__ import annotations

import torch

from megatron_emu.generation.forward import CachedForward
from megatron_emu.generation.prompts import Prompt


@torch.no_grad()
def continuation_logprobs(forward: CachedForward, prompt: Prompt, continuations: list[list[int]],
                          chunk: int = 32) -> list[float]:
    """Mean log p(token | prompt, earlier tokens) of each continuation (token ids, >= 1 each)."""
    if any(len(c) == 0 for c in continuations):
        raise ValueError("likelihood of an empty candidate: every answer option needs at least one token")
    first = forward.start([prompt])[0].log_softmax(dim=-1)  # (V,): the candidates' first tokens
    prompt_cache, device = forward.cache, forward.device
    out = []
    for start in range(0, len(continuations), chunk):
        group = continuations[start:start + chunk]
        width = max(len(c) for c in group)
        tokens = torch.tensor([c + [forward.pad_id] * (width - len(c)) for c in group], device=device)  # (C, L)
        lengths = torch.tensor([len(c) for c in group], device=device)  # (C,)
        logp = first[tokens[:, 0]][:, None]  # (C, 1)
        if width > 1:
            cache = prompt_cache.select(torch.zeros(len(group), dtype=torch.long, device=device))
            rest = forward.token_logprobs(tokens, cache)  # (C, L-1); under PP, every stage gets them
            logp = torch.cat([logp, rest], dim=1)  # (C, L)
        counted = torch.arange(width, device=device)[None, :] < lengths[:, None]  # (C, L)
        out += (logp.masked_fill(~counted, 0).sum(dim=1) / lengths).tolist()
    return out
