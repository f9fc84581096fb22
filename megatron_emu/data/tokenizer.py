"""Sentencepiece tokenizer plus Emu's added tokens (spec section 3).

The added tokens are appended after the sentencepiece vocabulary, so with LLaMA's
32000 pieces they get the spec's ids 32000..32005. The tiny preset uses a small
sentencepiece model trained on the synthetic corpus (built once, cached).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import sentencepiece as spm
import torch

from megatron_emu.config import (
    NUM_INSTRUCT_SPECIAL_TOKENS,
    NUM_PRETRAIN_SPECIAL_TOKENS,
    SPECIAL_TOKEN_NAMES,
    SpecialTokens,
)
from megatron_emu.data.locks import default_cache_dir, file_lock

TINY_VOCAB_SIZE = 512  # must equal PRESETS["tiny"].llm.base_vocab_size


class EmuTokenizer:
    """Sentencepiece pieces [0, base) followed by `num_special_tokens` added tokens."""

    def __init__(self, model_path: str, num_special_tokens: int = NUM_PRETRAIN_SPECIAL_TOKENS):
        if num_special_tokens not in (NUM_PRETRAIN_SPECIAL_TOKENS, NUM_INSTRUCT_SPECIAL_TOKENS):
            raise ValueError(f"{model_path}: num_special_tokens must be 4 or 6, got {num_special_tokens}")
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a readable sentencepiece model ({e})") from None
        self.model_path = model_path
        self.num_special_tokens = num_special_tokens
        self.base_vocab_size = self.sp.get_piece_size()
        self.special = SpecialTokens(self.base_vocab_size)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # Identifies the vocabulary (not the file: the proto also stores training paths):
        # datasets record it and refuse another tokenizer.
        vocab = "\n".join(f"{self.sp.id_to_piece(i)}\t{self.sp.get_score(i)}" for i in range(self.base_vocab_size))
        self.fingerprint = hashlib.sha256(vocab.encode()).hexdigest()[:16]
        self._names = {self.base_vocab_size + i: n for i, n in enumerate(SPECIAL_TOKEN_NAMES[:num_special_tokens])}

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.num_special_tokens

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Pieces decoded by sentencepiece; added tokens rendered by name."""
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in self._names:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._names[i])
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise ValueError(f"{self.model_path}: token id {i} outside the vocabulary of {self.vocab_size}")
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def resize_token_embeddings(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """(V, H) -> (new_rows, H); added rows are the mean of the old ones (spec section 3)."""
    old_rows = weight.shape[0]
    if new_rows <= old_rows:
        return weight[:new_rows].clone()
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, H)
    return torch.cat([weight, mean.expand(new_rows - old_rows, -1)], dim=0)  # (new_rows, H)


def build_tiny_tokenizer(cache_dir: str = "") -> str:
    """Train (once, cached) the tiny preset's sentencepiece model; return its path.

    Deterministic: fixed corpus (synthetic text, seed 0), one thread, no sampling.
    Safe when several processes call it at once on an empty cache.
    """

    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"tiny_spm_{TINY_VOCAB_SIZE}.model")
    if os.path.exists(path):
        return path
    # Concurrent first runs (several ranks): one trains, the others wait and reuse its file
    # (the proto records its training paths, so two builds would differ in bytes).
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            _train_tiny(cache_dir, path)
    return path


def _train_tiny(cache_dir: str, path: str) -> None:
    from megatron_emu.data.synthetic import corpus_text

    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        text_path = os.path.join(tmp, "corpus.txt")
        with open(text_path, "w") as f:
            f.write("\n".join(sorted(set(corpus_text(seed=0)))) + _GENERAL_TEXT)
        spm.SentencePieceTrainer.train(
            input=text_path, model_prefix=os.path.join(tmp, "tiny"), vocab_size=TINY_VOCAB_SIZE,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
            bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, input_sentence_size=0,
            shuffle_input_sentence=False,
        )
        os.replace(os.path.join(tmp, "tiny.model"), path)  # atomic: never seen half-written


# A little general English so that prompts outside the synthetic vocabulary still
# tokenise into sensible pieces (and the BPE has enough merges to reach 512 pieces).
_GENERAL_TEXT = """
the quick brown fox jumps over the lazy dog. what is in this image? describe the picture.
there is a shape in the image. how many objects are there? which colour is it? where is it?
the video shows an object moving. a photo of something. question answer user assistant.
this is a simple example of text that a language model can learn to predict from context.
numbers zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100
"""
