"""An Emu for inference from any of the forms we write, with the model size it was saved with.

- our checkpoint (DCP: the root with `latest`, or an iter_N/ directory), whatever TP/PP/DP
  layout saved it: the model config recorded in the checkpoint is used (vocabulary, padded
  rows), the preset is not needed;
- an HF export (tools/convert_checkpoint.py --to hf: a directory with visual/config.json);
- a single state-dict file (.safetensors / .pt) of the given preset; its vocabulary (4 or 6
  added tokens: Emu or Emu-I) is read from the embedding's rows.
A LoRA adapter on top of a base is not loadable yet: the adapter format belongs to the
instruction-tuning work (issue 16, first half), which this branch does not have.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS, NUM_PRETRAIN_SPECIAL_TOKENS, ModelConfig, get_preset
from megatron_emu.model.emu import Emu, build_emu


def load_for_inference(path: str, preset: str = "tiny", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Emu:
    """Frozen Emu (eval, no grads) with the weights at `path`."""
    from megatron_emu.decoder.frozen import check_emu_state, freeze, read_emu_state

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint, export or state-dict file")
    if os.path.isfile(os.path.join(path, "visual", "config.json")):
        from megatron_emu.convert.hf_emu import load_emu_from_hf

        return freeze(load_emu_from_hf(path).to(device, dtype))
    if os.path.isdir(path):
        from megatron_emu.convert.streams import DCPSource

        source = DCPSource(path)
        config = ModelConfig.from_dict(source.record["config"]["model"])
        state = source.read(list(source.entries))
    else:
        state = read_emu_state(path)
        config = with_vocabulary_of(get_preset(preset), state, path)
    model = build_emu(config, device="cpu", seed=0)
    check_emu_state(state, model, path)
    model.load_state_dict(state, strict=True)
    return freeze(model.to(device, dtype))


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
