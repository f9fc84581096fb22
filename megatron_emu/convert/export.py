"""Ours -> Hugging Face: the LLM as a transformers LlamaForCausalLM directory (config.json,
sharded safetensors + index, tokenizer with Emu's added tokens at the spec ids) and the
visual side (EVA ViT, ln_visual, Causal Former, regression head) in `visual/` as
safetensors + our model config (the layout: hf_emu.py, whose `load_emu_from_hf` rebuilds
the whole Emu). config.json states the model's real rope / norm settings (hf_llama_config.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_emu.config import SPECIAL_TOKEN_NAMES, LLaMAConfig, ModelConfig
from megatron_emu.direct_io import FileSpan
from megatron_emu.convert.hf_emu import VISUAL_DIR, VISUAL_FORMAT
from megatron_emu.convert.hf_llama_config import hf_llama_config
from megatron_emu.convert.keys import llama_to_hf
from megatron_emu.convert.streams import DCPSource, atomic_output_dir, plan_shards, write_sharded

VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")  # our names


def check_tokenizer(sp_model: str, llm: LLaMAConfig) -> dict[str, int]:
    """Fail fast (milliseconds, before any tensor is copied) on a tokenizer that cannot fit;
    returns the added tokens' ids, the spec's: base vocabulary + 0, 1, ..."""
    import sentencepiece

    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=sp_model).vocab_size()
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{sp_model}: not a sentencepiece model ({e})") from None
    if pieces != llm.base_vocab_size:
        raise ValueError(f"{sp_model}: vocab mismatch: {pieces} pieces, the model expects {llm.base_vocab_size}")
    return {n: llm.base_vocab_size + i for i, n in enumerate(SPECIAL_TOKEN_NAMES[: llm.num_special_tokens])}


def export_tokenizer(sp_model: str, llm: LLaMAConfig, directory: str) -> dict[str, int]:
    """transformers LlamaTokenizer from our sentencepiece model, added tokens at the spec ids."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, os.path.join(tmp, "tokenizer.model"))
        try:
            tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False)
        except Exception as e:
            raise ValueError(f"{sp_model}: cannot build a transformers tokenizer ({e})") from None
    if len(tokenizer) != llm.base_vocab_size:
        raise ValueError(f"{sp_model}: vocab mismatch: {len(tokenizer)} pieces, the model expects {llm.base_vocab_size}")
    names = list(SPECIAL_TOKEN_NAMES[: llm.num_special_tokens])
    tokenizer.add_tokens(names, special_tokens=True)
    ids = dict(zip(names, tokenizer.convert_tokens_to_ids(names)))
    expected = {n: llm.base_vocab_size + i for i, n in enumerate(names)}
    if ids != expected:
        raise ValueError(f"{sp_model}: added tokens got ids {ids}, the spec needs {expected}")
    tokenizer.pad_token = "[PAD]"
    tokenizer.save_pretrained(directory)
    shutil.copy(sp_model, os.path.join(directory, "tokenizer.model"))
    return ids


def _cast(tensor: torch.Tensor | FileSpan, dtype) -> torch.Tensor | FileSpan:
    if dtype is None or not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor  # a FileSpan stays one: its bytes are copied with O_DIRECT
    return (tensor.tensor() if isinstance(tensor, FileSpan) else tensor).to(dtype)


def _stream_shards(source: DCPSource, groups, rename, dtype, vocab: int | None = None):
    for group in groups:
        tensors = source.read(group, spans=True)
        if vocab is not None:  # drop the --make-vocab-size-divisible-by padding rows
            tensors = {n: (t.rows(vocab) if isinstance(t, FileSpan) else t[:vocab]) if n in VOCAB_ROWS else t
                       for n, t in tensors.items()}
        yield {rename(n): _cast(t, dtype) for n, t in tensors.items()}


def _export_group(source: DCPSource, names: list[str], rename, directory: str, max_shard_bytes: int, dtype,
                  vocab: int | None = None) -> None:
    scale = 1.0 if dtype is None else None
    sizes = []
    for n in names:
        size = source.nbytes(n)
        if scale is None:
            size = size // source.entries[n].properties.dtype.itemsize * dtype.itemsize
        sizes.append((n, size))
    groups = plan_shards(sizes, max_shard_bytes)
    write_sharded(directory, _stream_shards(source, groups, rename, dtype, vocab), len(groups), sum(s for _, s in sizes))


def export_hf(checkpoint: str, output: str, tokenizer_model: str, max_shard_bytes: int = 5 * 2**30, dtype=None) -> None:
    """Our DCP checkpoint (any layout) -> `output` (nothing is left there on failure)."""
    source = DCPSource(checkpoint)
    config = ModelConfig.from_dict(source.record["config"]["model"])
    padded = config.llm.padded_vocab_size != config.llm.vocab_size
    # Hugging Face gets the real vocabulary only: padding rows are dropped on export.
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, make_vocab_size_divisible_by=1))
    llm_names = [n for n in source.entries if llama_to_hf(n) is not None]
    visual_names = [n for n in source.entries if llama_to_hf(n) is None]
    ids = check_tokenizer(tokenizer_model, config.llm)
    # Built before the tokenizer thread starts: transformers' lazy imports from two threads at
    # once failed ("cannot import name 'LlamaConfig'") in a fresh process.
    llama_config = hf_llama_config(config.llm, ids)
    with atomic_output_dir(output) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        # The transformers tokenizer conversion (~0.5 s of Python at 32000 pieces) runs
        # while the shards copy, which mostly wait on the disk; its errors still fail the
        # export before anything is published.
        tokenizer = pool.submit(export_tokenizer, tokenizer_model, config.llm, tmp)
        llama_config.save_pretrained(tmp)
        _export_group(source, llm_names, llama_to_hf, tmp, max_shard_bytes, dtype, config.llm.vocab_size if padded else None)
        os.makedirs(os.path.join(tmp, VISUAL_DIR))
        _export_group(source, visual_names, lambda n: n, os.path.join(tmp, VISUAL_DIR), max_shard_bytes, dtype)
        with open(os.path.join(tmp, VISUAL_DIR, "config.json"), "w") as f:
            json.dump({"format": VISUAL_FORMAT, "model": dataclasses.asdict(config)}, f, indent=2)
        tokenizer.result()
