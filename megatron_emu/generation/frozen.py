"""The frozen parts of the decoder setup: Emu (weights from `--emu-load`) and the VAE.

`--emu-load` takes one of
- a pretraining checkpoint directory of ours (DCP: the root with `latest`, or an
  iter_N/ directory), read single-process whatever TP/PP/DP layout saved it,
- a single state-dict file of Emu (.safetensors, or .pt/.bin as saved by torch.save,
  optionally wrapped as {"model": state_dict}).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from megatron_emu.config import LLAMA_FUNCTION_FIELDS, ModelConfig
from megatron_emu.model.emu import Emu, build_emu


def freeze(module: nn.Module) -> nn.Module:
    """eval mode, no grads: frozen weights must stay bit-identical (and dropout off)."""
    module.requires_grad_(False)
    return module.eval()


def load_emu(config: ModelConfig, path: str, device: torch.device | str = "cpu") -> Emu:
    """A frozen Emu of `config` with the weights at `path` (empty path: random, for smoke runs),
    read tensor by tensor into a model built without initialising it (generation/loading.py
    read_part): at 14B no random init and no second copy of the weights. One of our
    checkpoints also sets what its LLaMA computes (norm eps, rope: e.g. an imported LLaMA-2's
    1e-5), whatever the preset says."""
    if not path:
        return freeze(build_emu(config, device="cpu", seed=0).to(device))
    from megatron_emu.generation.loading import read_part, state_file_source

    if os.path.isdir(path):
        from megatron_emu.convert.streams import DCPSource
        from megatron_emu.training.checkpoint_files import recorded_model_config

        saved = recorded_model_config(path).llm
        config = dataclasses.replace(config, llm=dataclasses.replace(
            config.llm, **{f: getattr(saved, f) for f in LLAMA_FUNCTION_FIELDS}))
        source = DCPSource(path)
    elif os.path.isfile(path):
        source = state_file_source(path)
    else:
        raise ValueError(f"{path}: --emu-load does not exist")
    head = "regression_head.weight"  # (hidden, hidden): the one shape that says the model's width
    hidden = config.llm.hidden
    if head in source.entries and source.shape(head) != (hidden, hidden):
        raise ValueError(f"{path}: Emu hidden size {source.shape(head)[0]} but the preset's is {hidden}")
    return freeze(read_part(source, config, lambda emu: emu).to(device))
