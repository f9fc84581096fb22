"""A chat prompt at generation is token for token the training sample of the same
conversation up to where its last answer starts: for language (no system message), image
and video conversations, written by tools/preprocess_data.py and read by the loader, as
training reads them; the images are the same pixels. Also with a tokenizer that keeps
whitespace as LLaMA's does (remove_extra_whitespaces=false), where a prompt tokenized as
one string gets a stray "▁" before every [ASSISTANT] that training never saw."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.indexed import MultimodalIndexed
from megatron_emu.data.samples import SeqSpec, make_view
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.generation.prompts import Video, build_prompt, chat_prompt
from tests.instruct_fixtures import write_fixtures
from tools.preprocess_data import main as preprocess_main

CONFIG = get_preset("tiny")
SHAREGPT_TURNS = [("what is the quick brown fox?", "a lazy dog."), ("how many objects are there?", "there are two.")]


def whitespace_keeping_tokenizer(root) -> str:
    """The tiny tokenizer's training, but keeping whitespace as LLaMA's sentencepiece model does."""
    import sentencepiece as spm

    from megatron_emu.data.synthetic import corpus_text
    from megatron_emu.data.tokenizer import _GENERAL_TEXT, TINY_VOCAB_SIZE

    (root / "corpus.txt").write_text("\n".join(sorted(set(corpus_text(seed=0)))) + _GENERAL_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "keeps"), vocab_size=TINY_VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, minloglevel=2, remove_extra_whitespaces=False)
    return str(root / "keeps.model")


@pytest.fixture(scope="module", params=["tiny", "keeps-whitespace"])
def written(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("chat")
    model = build_tiny_tokenizer() if request.param == "tiny" else whitespace_keeping_tokenizer(root)
    tokenizer = EmuTokenizer(model, 6)
    out = {}
    for kind, path in write_fixtures(str(root)).items():
        prefix = str(root / f"{kind}_data")
        preprocess_main(["--input-type", kind, "--input", path, "--output-prefix", prefix,
                         "--tokenizer-model", tokenizer.model_path, "--no-progress"])
        out[kind] = prefix
    return root, tokenizer, out


def training_prefix(prefix: str, tokenizer) -> tuple[list[int], list]:
    """The training sample's tokens before its last answer, and its images."""
    spec = SeqSpec.from_tokenizer(tokenizer, 512)
    sample = make_view(MultimodalIndexed(prefix), spec).build(0, (0,))
    mask = np.array(sample.answer_mask)
    last_answer = int(np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)[-1])
    return sample.tokens[:last_answer], sample.images


@pytest.mark.parametrize("kind", ["sharegpt", "alpaca", "llava", "videochat"])
def test_chat_prompt_equals_the_training_template(written, kind):
    root, tokenizer, prefixes = written
    turns, visual = {
        "sharegpt": (SHAREGPT_TURNS, None),
        "alpaca": ([("describe the picture.\na red shape", "it is red.")], None),
        "llava": ([("which colour is it?", "red.")], Path(root / "red.png")),
        "videochat": ([("what does the video show?", "an object moving.")], Video.from_path(str(root / "frames"))),
    }[kind]
    expected, images = training_prefix(prefixes[kind], tokenizer)
    prompt = build_prompt(chat_prompt(tokenizer, turns[:-1], turns[-1][0], visual), tokenizer, CONFIG)
    assert prompt.tokens == expected
    assert prompt.tokens[-1] != tokenizer.special.assistant  # the template's ":" after [ASSISTANT] is there
    assert len(images) == {"llava": 1, "videochat": 8}.get(kind, 0) == len(prompt.images)
    for stored, given in zip(images, prompt.images):
        assert torch.equal(torch.as_tensor(np.asarray(stored)), given)  # the same pixels


def test_language_chat_has_no_system_message(written):
    _, tokenizer, _ = written
    ids = build_prompt(chat_prompt(tokenizer, [], "hi"), tokenizer, CONFIG).tokens
    assert ids[:2] == [tokenizer.bos_id, tokenizer.special.user]  # Appendix B.2: none for language data
