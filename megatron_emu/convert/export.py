"""Ours -> Hugging Face: the LLM as a transformers LlamaForCausalLM directory (config.json,
sharded safetensors + index, tokenizer with Emu's added tokens at the spec ids) and the
visual side (EVA ViT, ln_visual, Causal Former, regression head) in `visual/` as
safetensors + our model config, so `load_emu_from_hf` rebuilds the whole Emu."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_emu.config import (
    SPECIAL_TOKEN_NAMES,
    CausalFormerConfig,
    LLaMAConfig,
    ModelConfig,
    VisionConfig,
)
from megatron_emu.convert.direct_io import FileSpan
from megatron_emu.convert.keys import hf_to_llama, llama_to_hf
from megatron_emu.convert.streams import DCPSource, SafetensorsSource, atomic_output_dir, plan_shards, write_sharded
from megatron_emu.files import read_json

VISUAL_DIR = "visual"
VISUAL_FORMAT = "megatron_emu.emu-visual/1"
VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")  # our names


def model_config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(**d["vision"]),
        causal_former=CausalFormerConfig(**d["causal_former"]),
        llm=LLaMAConfig(**d["llm"]),
        init_std=d.get("init_std", 0.02),
    )


def hf_llama_config(llm: LLaMAConfig, special_ids: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.ffn_dim,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.heads,
        max_position_embeddings=llm.max_positions, rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=special_ids["[PAD]"], torch_dtype="float32",
    )


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
    config = model_config_from_dict(source.record["config"]["model"])
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


def read_visual_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, VISUAL_DIR, "config.json")
    record = read_json(path, "not an Emu export")
    if record.get("format") != VISUAL_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {VISUAL_FORMAT!r}")
    return model_config_from_dict(record["model"])


def hf_emu_tensors(directory: str, spans: bool = False):
    """(our name, tensor) for every tensor of an export made by export_hf; with spans=True
    (our name, FileSpan): where the bytes lie, nothing read (SafetensorsSource.spans)."""
    llm, visual = SafetensorsSource(directory), SafetensorsSource(os.path.join(directory, VISUAL_DIR))
    for name, tensor in llm.spans() if spans else llm:
        ours = hf_to_llama(name)
        if ours is None:
            raise ValueError(f"{directory}: unexpected tensor {name}")
        yield ours, tensor
    yield from visual.spans() if spans else visual


def load_emu_from_hf(directory: str, device: str = "cpu"):
    """The whole Emu from an export directory (for inference)."""
    from megatron_emu.convert.imports import assign_all
    from megatron_emu.model.emu import build_emu

    config = read_visual_config(directory)
    model = build_emu(config, device=device, seed=0)
    assign_all(model, hf_emu_tensors(directory), source=directory, required=("",))
    return model
