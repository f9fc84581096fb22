"""Text generation: cached, left-padded batched decoding equals full recomputation of each
prompt alone (greedy, sampling, beam search); beam width 1 is greedy; sampling is seeded;
stop tokens and max_new_tokens end a row; bad settings are refused in one line."""

import numpy as np
import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.generation.decoding import DecodingConfig, generate
from megatron_emu.generation.forward import CachedForward
from megatron_emu.generation.prompts import Video, build_prompt
from megatron_emu.model.emu import build_emu

pytest.importorskip("transformers")  # the logits processors
CONFIG = get_preset("tiny")


class FullRecompute:
    """The reference: every step reruns each row's whole sequence alone, no cache, no padding."""

    def __init__(self, emu):
        self.emu, self.pad_id, self.device = emu, CONFIG.special_tokens.pad, torch.device("cpu")
        self.never = list(CONFIG.special_tokens.ignored_in_ce)

    def start(self, prompts):
        self.rows = [(list(p.tokens), p.images) for p in prompts]
        width = max(len(p.tokens) for p in prompts)
        self.tokens = torch.tensor([[self.pad_id] * (width - len(p.tokens)) + p.tokens for p in prompts])
        return self._logits()

    def step(self, tokens):
        self.rows = [(row + [t], images) for (row, images), t in zip(self.rows, tokens.tolist())]
        return self._logits()

    def reorder(self, rows):
        self.rows = [self.rows[i] for i in rows.tolist()]

    @torch.no_grad()
    def _logits(self):
        out = [self.emu(torch.tensor([row]), images).logits[0, -1] for row, images in self.rows]
        logits = torch.stack(out).float()  # (B, V)
        logits[:, self.never] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def setup():
    emu = build_emu(CONFIG, seed=0).eval()
    tokenizer = EmuTokenizer(build_tiny_tokenizer())
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # noqa: E731
    items = [  # lengths 5 .. 72: left padding of 0 to 67 slots
        ["a red circle"],
        [image(), "describing the image in detail. the image shows"],
        ["two frames:", Video([image(), image()]), "a video of"],
    ]
    prompts = [build_prompt(i, tokenizer, CONFIG) for i in items]
    return emu, prompts


def run(forward, prompts, stop_ids=None, **config):
    with torch.no_grad():
        return generate(forward, prompts, DecodingConfig(**config), stop_ids or {})


def test_padded_batch_logits_equal_each_prompt_alone(setup):
    emu, prompts = setup
    forward = CachedForward(emu)
    batched = forward.start(prompts)
    alone = FullRecompute(emu).start(prompts)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    token = batched.argmax(dim=-1)
    reference = FullRecompute(emu)
    reference.start(prompts)
    torch.testing.assert_close(forward.step(token), reference.step(token), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [
    {"max_new_tokens": 4},
    {"max_new_tokens": 4, "repetition_penalty": 1.3},
    {"max_new_tokens": 4, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8, "seed": 3},
    {"max_new_tokens": 3, "num_beams": 3},
], ids=["greedy", "repetition", "sampling", "beam3"])
def test_cached_decoding_equals_full_recomputation(setup, config):
    emu, prompts = setup
    cached = run(CachedForward(emu), prompts, **config)
    full = run(FullRecompute(emu), prompts, **config)
    assert [g.tokens for g in cached] == [g.tokens for g in full]
    assert all(len(g.tokens) == config["max_new_tokens"] and g.stop == "length" for g in cached)


def test_batched_prompt_gives_the_same_tokens_as_alone(setup):
    emu, prompts = setup
    batched = run(CachedForward(emu), prompts, max_new_tokens=8, repetition_penalty=1.2)
    for prompt, together in zip(prompts, batched):
        assert run(CachedForward(emu), [prompt], max_new_tokens=8, repetition_penalty=1.2)[0] == together


def test_beam_width_one_is_greedy_also_when_it_stops(setup):
    emu, prompts = setup
    greedy = run(CachedForward(emu), prompts, max_new_tokens=6)
    for prompt, g in zip(prompts, greedy):
        assert run(CachedForward(emu), [prompt], max_new_tokens=6, num_beams=1)[0].tokens == g.tokens
        stop = {g.tokens[3]: "eos"}  # greedy's 4th token made a stop token: both end there
        expected = run(CachedForward(emu), [prompt], stop, max_new_tokens=6)[0]
        got = run(CachedForward(emu), [prompt], stop, max_new_tokens=6, num_beams=1)[0]
        assert got == expected and expected.stop == "eos" and expected.tokens == g.tokens[:g.tokens.index(g.tokens[3])]


def test_stop_tokens_end_their_row_only(setup):
    emu, prompts = setup
    free = run(CachedForward(emu), prompts, max_new_tokens=6)
    stop = {free[1].tokens[2]: "user"}  # e.g. [USER] for Emu-I: the model opens the next turn
    stopped = run(CachedForward(emu), prompts, stop, max_new_tokens=6)
    assert stopped[1].stop == "user" and stopped[1].tokens == free[1].tokens[:free[1].tokens.index(free[1].tokens[2])]
    for row in (0, 2):  # a row without that token runs to max_new_tokens unchanged
        if free[1].tokens[2] not in free[row].tokens:
            assert stopped[row] == free[row]


def test_sampling_is_reproducible_by_seed(setup):
    emu, prompts = setup
    config = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    first = run(CachedForward(emu), prompts, seed=7, **config)
    assert run(CachedForward(emu), prompts, seed=7, **config) == first
    assert run(CachedForward(emu), prompts, seed=8, **config) != first


def test_beam_search_scores_at_least_greedy_on_two_tokens(setup):
    """Two steps, width 8: the beam keeps greedy's first token, so its best two-token
    sequence is at least as likely as greedy's (length_penalty 0: summed log-probability)."""
    emu, prompts = setup
    for prompt in prompts:
        forward = CachedForward(emu)
        greedy = run(forward, [prompt], max_new_tokens=2)[0].tokens
        beam = run(forward, [prompt], max_new_tokens=2, num_beams=8, length_penalty=0.0)[0].tokens
        assert sequence_logprob(emu, prompt, beam) >= sequence_logprob(emu, prompt, greedy) - 1e-5


def sequence_logprob(emu, prompt, tokens):
    reference = FullRecompute(emu)
    total, logits = 0.0, reference.start([prompt])
    for t in tokens:
        total += float(logits.log_softmax(dim=-1)[0, t])
        logits = reference.step(torch.tensor([t]))
    return total


@pytest.mark.parametrize("config, message", [
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"num_beams": 2, "do_sample": True}, "beam search is deterministic"),
    ({"temperature": 0.0}, "--temperature"),
    ({"top_p": 0.0}, "--top-p"),
    ({"repetition_penalty": -1.0}, "--repetition-penalty"),
])
def test_bad_decoding_settings_are_refused(setup, config, message):
    emu, prompts = setup
    with pytest.raises(ValueError, match=message):
        run(CachedForward(emu), prompts[:1], **config)
