"""Tokenizer: added-token ids, round trip, tiny model size and determinism, embedding resize."""

import pytest
import torch

from megatron_emu.config import PRESETS, SPECIAL_TOKEN_NAMES, SpecialTokens
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer, resize_token_embeddings


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer"))


def test_llama_ids_match_spec():
    s = SpecialTokens(32000)
    assert (s.pad, s.img_start, s.img_end, s.image, s.user, s.assistant) == tuple(range(32000, 32006))


def test_tiny_tokenizer_matches_preset(tiny_path):
    tok = EmuTokenizer(tiny_path)
    assert tok.base_vocab_size == PRESETS["tiny"].llm.base_vocab_size == 512
    assert tok.vocab_size == 516
    assert EmuTokenizer(tiny_path, num_special_tokens=6).vocab_size == 518
    assert tok.special.image == 515 and tok.special.pad == 512


def test_encode_decode_round_trip(tiny_path):
    tok = EmuTokenizer(tiny_path)
    text = "two red circles on the left."
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.base_vocab_size for i in ids)
    assert tok.decode(ids) == text
    # Outside the synthetic vocabulary: byte fallback still round-trips.
    assert tok.decode(tok.encode("Zebra ü 42!")) == "Zebra ü 42!"


def test_decode_names_special_tokens(tiny_path):
    tok = EmuTokenizer(tiny_path, num_special_tokens=6)
    s = tok.special
    ids = [s.img_start, s.image, s.img_end] + tok.encode("a cat") + [s.user, s.assistant, s.pad]
    assert tok.decode(ids) == "[IMG]<image>[/IMG]a cat[USER][ASSISTANT][PAD]"
    assert SPECIAL_TOKEN_NAMES[3] == "<image>"


def test_decode_rejects_ids_outside_vocabulary(tiny_path):
    tok = EmuTokenizer(tiny_path)  # 4 added tokens: [USER] is not in this vocabulary
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.special.user])


def test_tiny_tokenizer_is_deterministic_and_cached(tiny_path, tmp_path):
    other = build_tiny_tokenizer(str(tmp_path))
    assert EmuTokenizer(other).fingerprint == EmuTokenizer(tiny_path).fingerprint
    assert build_tiny_tokenizer(str(tmp_path)) == other  # second call: cached file


def test_bad_model_file_is_refused(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        EmuTokenizer(str(bad))


def test_resize_token_embeddings_adds_mean_rows():
    w = torch.randn(10, 4)
    out = resize_token_embeddings(w, 14)
    assert out.shape == (14, 4)
    assert torch.equal(out[:10], w)
    assert torch.allclose(out[10:], w.mean(0, keepdim=True).expand(4, 4))
    assert resize_token_embeddings(w, 8).shape == (8, 4)
