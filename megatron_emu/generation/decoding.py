"""Decoding strategies over a `CachedForward` (generation/forward.py): next-token logits per row.

- greedy: the most likely token;
- sampling: temperature, then top-k, then top-p (nucleus), drawn from a seeded generator;
- beam search: `num_beams` hypotheses per prompt, scored by summed log-probability over
  length ** length_penalty (Hugging Face's scoring, with its stopping rule); width 1 is greedy.
Repetition penalty (CTRL, as in Hugging Face) applies to every strategy over the prompt's and
the generated tokens. The logits processors are transformers' own, so the semantics are the
ones users know. A row stops at a stop token (EOS, and [USER] for Emu-I: the next turn) or
after `max_new_tokens`; the stop token is not part of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_emu.generation.forward import CachedForward
from megatron_emu.generation.prompts import Prompt


@dataclass
class DecodingConfig:
    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    length_penalty: float = 1.0  # beam search: score = sum log p / length ** length_penalty
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search is deterministic: use --num-beams 1 with --sample")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--top-k must be >= 0 and --top-p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the stop token
    stop: str  # "eos", "user" ([USER]: the model starts the next turn) or "length"


def logits_processors(config: DecodingConfig):
    """transformers' processors for this config: penalty first, then the sampling warpers."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k > 0:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def generate(forward: CachedForward, prompts: list[Prompt], config: DecodingConfig,
             stop_ids: dict[int, str]) -> list[Generation]:
    """Every prompt decoded with `config`; stop_ids maps a stop token to its reason."""
    config.validate()
    if config.num_beams > 1:
        return [beam_search(forward, p, config, stop_ids) for p in prompts]
    return greedy_or_sample(forward, prompts, config, stop_ids)


@torch.no_grad()
def greedy_or_sample(forward: CachedForward, prompts: list[Prompt], config: DecodingConfig,
                     stop_ids: dict[int, str]) -> list[Generation]:
    """All prompts as one left-padded batch; a finished row is fed padding until all stop."""
    process = logits_processors(config)
    generator = torch.Generator(forward.device).manual_seed(config.seed)
    logits, seen = forward.start(prompts), forward.tokens  # (B, V), (B, S)
    out, stops = [[] for _ in prompts], [None] * len(prompts)
    for step in range(config.max_new_tokens):
        scores = process(seen, logits)  # (B, V)
        if config.do_sample:
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            chosen = scores.argmax(dim=-1)  # (B,)
        for row, token in enumerate(chosen.tolist()):
            if stops[row] is None:
                if token in stop_ids:
                    stops[row] = stop_ids[token]
                else:
                    out[row].append(token)
        if all(s is not None for s in stops) or step == config.max_new_tokens - 1:
            break
        finished = torch.tensor([s is not None for s in stops], device=chosen.device)
        chosen = chosen.masked_fill(finished, forward.pad_id)  # (B,)
        seen = torch.cat([seen, chosen[:, None]], dim=1)  # (B, S + step + 1)
        logits = forward.step(chosen)
    return [Generation(tokens, stop or "length") for tokens, stop in zip(out, stops)]


@torch.no_grad()
def beam_search(forward: CachedForward, prompt: Prompt, config: DecodingConfig,
                stop_ids: dict[int, str]) -> Generation:
    """One prompt, `num_beams` rows. The prompt runs once; its cache is copied to the beams."""
    width, process = config.num_beams, logits_processors(config)
    logits, seen = forward.start([prompt]), forward.tokens  # (1, V), (1, S)
    sums = torch.zeros(1, device=logits.device)  # (n,) summed log-probabilities of the live beams
    beams: list[list[int]] = [[]]
    finished: list[tuple[float, list[int], str]] = []  # (score, tokens, stop)
    score = lambda total, length: total / length ** config.length_penalty  # noqa: E731
    for step in range(config.max_new_tokens):
        logp = process(seen, logits).log_softmax(dim=-1)  # (n, V)
        vocab = logp.shape[-1]
        totals, flat = (sums[:, None] + logp).flatten().topk(min(2 * width + len(stop_ids), logp.numel()))
        # (2W + stops,): enough that `width` live candidates remain however many stops rank high
        live = []  # (total, beam, token), best first
        for rank, (total, index) in enumerate(zip(totals.tolist(), flat.tolist())):
            beam, token = divmod(index, vocab)
            if token in stop_ids:
                if rank < width:  # a stop below the top `width` is not a hypothesis (as in HF)
                    finished.append((score(total, step + 1), beams[beam], stop_ids[token]))
            else:
                live.append((total, beam, token))
            if len(live) == width:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        best_live = score(live[0][0], step + 1)
        if len(finished) == width and finished[-1][0] >= best_live:
            break  # no live beam can beat the kept hypotheses (HF's rule, early_stopping=False)
        beams = [beams[b] + [t] for _, b, t in live]
        if step == config.max_new_tokens - 1:
            finished += [(score(total, step + 1), tokens, "length") for (total, _, _), tokens in zip(live, beams)]
            break
        rows = torch.tensor([b for _, b, _ in live], device=logits.device)  # (W,)
        chosen = torch.tensor([t for _, _, t in live], device=logits.device)  # (W,)
        forward.reorder(rows)
        seen = torch.cat([seen.index_select(0, rows), chosen[:, None]], dim=1)  # (W, S + step + 1)
        sums = torch.tensor([total for total, _, _ in live], device=logits.device)
        logits = forward.step(chosen)
    _, tokens, stop = max(finished, key=lambda f: f[0])
    return Generation(tokens, stop)
