"""Where the tensors of each form of an Emu lie, so that a rank can read a part of them.

- our checkpoint (DCP: the root with `latest`, or an iter_N/ directory), whatever TP/PP/DP
  layout saved it, its model config recorded (convert/streams.py DCPSource); an
  instruction-tuning checkpoint is one too (adapters only: is_adapters);
- an HF export (tools/convert_checkpoint.py --to hf: a directory with visual/config.json),
  its config in visual/config.json, its tensors shard by shard;
- a single state-dict file (.safetensors / .pt) of the given preset, its vocabulary (4 or 6
  added tokens: Emu or Emu-I) read from the embedding's rows.
Every source answers `entries` (name -> shape or metadata), `shape(name)` and `read(names)`.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS, NUM_PRETRAIN_SPECIAL_TOKENS, ModelConfig, get_preset


def partial_source(path: str, preset: str = "tiny"):
    """(source, model config) for a form whose tensors are read a part at a time (read_part):
    our checkpoint (its recorded config; adapters: is_adapters, built by adapted_on_base), an
    HF export (its visual/config.json) or a single state-dict file of `preset` (.safetensors,
    or torch.save'd)."""
    if os.path.isfile(path):
        source = state_file_source(path)
        return source, with_vocabulary_of(get_preset(preset), source.entries.get(EMBEDDING, (None,))[0], path)
    if os.path.isfile(os.path.join(path, "visual", "config.json")):
        from megatron_emu.convert.hf_emu import hf_emu_tensors, read_visual_config

        return SpanSource(path, dict(hf_emu_tensors(path, spans=True))), read_visual_config(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint, export or state-dict file")
    from megatron_emu.convert.streams import DCPSource

    source = DCPSource(path)
    return source, ModelConfig.from_dict(source.record["config"]["model"])


def is_adapters(source) -> bool:
    """An instruction-tuning checkpoint: LoRA adapters only, to be put on their base."""
    return bool(getattr(source, "record", {}).get("config", {}).get("lora", {}).get("rank"))


class SpanSource:
    """Named tensors, each where its bytes lie in a file (a FileSpan, read when asked for) or
    memory-mapped: a rank reads, or touches the pages of, its part alone."""

    def __init__(self, path: str, items: dict):
        self.path, self.items = path, items
        self.entries: dict[str, tuple[int, ...]] = {name: tuple(item.shape) for name, item in items.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.items[name] if torch.is_tensor(self.items[name]) else self.items[name].tensor()
                for name in names}


def state_file_source(path: str) -> SpanSource:
    """A single state-dict file: safetensors through its header and positioned reads (no mmap
    of the whole file, which fails for a file larger than memory); a torch file memory-mapped."""
    from megatron_emu.convert.streams import TorchFileSource, check_length, header_spans

    if not path.endswith(".safetensors"):
        return SpanSource(path, TorchFileSource(path).state)  # a one-line ValueError for an unreadable file
    try:
        spans = header_spans(path)
        check_length(path)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    unknown = [name for name, span in spans.items() if span is None]
    if unknown:
        raise ValueError(f"{path}: {unknown[0]} has a dtype torch cannot read here")
    return SpanSource(path, spans)


EMBEDDING = "llm.tok_embeddings.weight"


def with_vocabulary_of(config: ModelConfig, rows: int | None, path: str) -> ModelConfig:
    """The preset with as many added tokens as the embedding has rows for (4 or 6)."""
    if rows is None:
        raise ValueError(f"{path}: no {EMBEDDING}: not an Emu state dict")
    added = rows - config.llm.base_vocab_size
    if added not in (NUM_PRETRAIN_SPECIAL_TOKENS, NUM_INSTRUCT_SPECIAL_TOKENS):
        raise ValueError(f"{path}: embedding has {rows} rows; this preset's vocabulary is "
                         f"{config.llm.base_vocab_size} + 4 (Emu) or + 6 (Emu-I)")
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_special_tokens=added))
