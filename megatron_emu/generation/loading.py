"""An Emu for inference from any of the forms we write, with the model size it was saved with.

- our checkpoint (DCP: the root with `latest`, or an iter_N/ directory), whatever TP/PP/DP
  layout saved it: the model config recorded in the checkpoint is used (vocabulary, padded
  rows), the preset is not needed;
- an HF export (tools/convert_checkpoint.py --to hf: a directory with visual/config.json);
- a single state-dict file (.safetensors / .pt) of the given preset; its vocabulary (4 or 6
  added tokens: Emu or Emu-I) is read from the embedding's rows;
- an instruction-tuning checkpoint (adapters only, pretrain_emu.py --lora-rank): built on
  its base as training builds it (the base grown by [USER] / [ASSISTANT], their rows set
  from the words, the adapters loaded) and merged as --lora-merge merges, so it decodes
  the tokens of the merged checkpoint. The base is the one the checkpoint records, or
  `base` (--pretrained-checkpoint); one whose fingerprint differs from the record is refused.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS, NUM_PRETRAIN_SPECIAL_TOKENS, ModelConfig, get_preset
from megatron_emu.model.emu import Emu, build_emu


def load_for_inference(path: str, preset: str = "tiny", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, base: str = "", tokenizer_model: str = "") -> Emu:
    """Frozen Emu (eval, no grads) with the weights at `path` (and, for adapters, `base`).
    tokenizer_model: the tokenizer of an adapter run (the words "user" / "assistant")."""
    from megatron_emu.generation.frozen import check_emu_state, freeze, read_emu_state

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint, export or state-dict file")
    hf_export = os.path.isfile(os.path.join(path, "visual", "config.json"))
    if base and (hf_export or not os.path.isdir(path)):
        raise ValueError(f"--pretrained-checkpoint {base}: only an adapter checkpoint --load has a base, not {path}")
    if hf_export:
        from megatron_emu.convert.hf_emu import load_emu_from_hf

        return freeze(load_emu_from_hf(path).to(device, dtype))
    if os.path.isdir(path):
        from megatron_emu.convert.streams import DCPSource

        source = DCPSource(path)
        config = ModelConfig.from_dict(source.record["config"]["model"])
        if source.record["config"].get("lora", {}).get("rank"):
            return freeze(adapted_on_base(source, config, base, tokenizer_model).to(device, dtype))
        if base:
            raise ValueError(f"--pretrained-checkpoint {base}: {source.path} is a full checkpoint, not adapters")
        state = source.read(list(source.entries))
    else:
        state = read_emu_state(path)
        config = with_vocabulary_of(get_preset(preset), state, path)
    model = build_emu(config, device="cpu", seed=0)
    check_emu_state(state, model, path)
    model.load_state_dict(state, strict=True)
    return freeze(model.to(device, dtype))


def whole_model_checkpoint(path: str):
    """(DCPSource, its model config) for our checkpoint of a whole Emu, whose tensors a rank can
    read a part of (read_part); None for the other forms (adapters, an HF export, a state file)."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "visual", "config.json")):
        return None
    from megatron_emu.convert.streams import DCPSource

    source = DCPSource(path)
    if source.record["config"].get("lora", {}).get("rank"):
        return None
    return source, ModelConfig.from_dict(source.record["config"]["model"])


def read_part(source, config: ModelConfig, keep) -> Emu:
    """The frozen part `keep(emu)` of the checkpoint's Emu (float32, CPU), reading its tensors
    only: a pipeline stage of a 14B model without the whole model in memory."""
    from megatron_emu.generation.frozen import freeze

    model = keep(build_emu(config, device="meta"))
    model.to_empty(device="cpu")
    model.llm.init_rope()  # the one buffer (not saved)
    names = sorted(model.state_dict())
    missing = [n for n in names if n not in source.entries]
    if missing:
        raise ValueError(f"{source.path}: not an Emu of its recorded config (missing {missing[:3]})")
    model.load_state_dict(source.read(names), strict=True)
    return freeze(model)


def with_vocabulary_of(config: ModelConfig, state: dict, path: str) -> ModelConfig:
    """The preset with as many added tokens as the state's embedding has rows for (4 or 6)."""
    rows = state.get("llm.tok_embeddings.weight")
    if rows is None:
        raise ValueError(f"{path}: no llm.tok_embeddings.weight: not an Emu state dict")
    added = rows.shape[0] - config.llm.base_vocab_size
    if added not in (NUM_PRETRAIN_SPECIAL_TOKENS, NUM_INSTRUCT_SPECIAL_TOKENS):
        raise ValueError(f"{path}: embedding has {rows.shape[0]} rows; this preset's vocabulary is "
                         f"{config.llm.base_vocab_size} + 4 (Emu) or + 6 (Emu-I)")
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_special_tokens=added))


def adapted_on_base(source, config: ModelConfig, base: str, tokenizer_model: str) -> Emu:
    """An adapter checkpoint (DCPSource) on its base, merged: the steps of --lora-merge
    (training/instruct.py merge_checkpoint) in memory."""
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
    from megatron_emu.model.lora import LoRASpec, apply_lora, merge_lora
    from megatron_emu.training.instruct import init_new_chat_token_rows
    from megatron_emu.training.pretrained import base_identity, check_same_base, load_pretrained

    recorded = source.record.get("pretrained_checkpoint")
    if not base:
        if recorded is None:
            raise ValueError(f"{source.path}: adapters that record no base checkpoint: give --pretrained-checkpoint")
        base = recorded["directory"]
        if not os.path.isdir(base):
            raise ValueError(f"{source.path}: its base {base} is gone: give --pretrained-checkpoint (the same base)")
    check_same_base(source.path, recorded, base_identity(base))
    lora = source.record["config"]["lora"]
    model = build_emu(config, device="cpu", seed=0)
    adapters = set(apply_lora(model, LoRASpec(lora["rank"], lora["alpha"])))
    if set(source.entries) != adapters:
        raise ValueError(f"{source.path}: holds {len(source.entries)} tensors, not the {len(adapters)} adapters "
                         f"of rank {lora['rank']} its run config describes")
    load_pretrained(base, [model], dataclasses.asdict(config))
    model.load_state_dict(source.read(sorted(adapters)), strict=False)  # adapters only (checksums verified)
    tokenizer = EmuTokenizer(tokenizer_model or build_tiny_tokenizer(), config.llm.num_special_tokens)
    init_new_chat_token_rows([model], tokenizer, base)
    merge_lora(model)
    return model
