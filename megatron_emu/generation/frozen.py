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
    """A frozen Emu of `config` with the weights at `path` (empty path: random, for smoke runs).
    One of our checkpoints also sets what its LLaMA computes (norm eps, rope: e.g. an imported
    LLaMA-2's 1e-5), whatever the preset says."""
    if path and os.path.isdir(path):
        from megatron_emu.training.checkpoint_files import recorded_model_config

        saved = recorded_model_config(path).llm
        config = dataclasses.replace(config, llm=dataclasses.replace(
            config.llm, **{f: getattr(saved, f) for f in LLAMA_FUNCTION_FIELDS}))
    model = build_emu(config, device="cpu", seed=0)
    if path:
        state = read_emu_state(path)
        check_emu_state(state, model, path)
        model.load_state_dict(state, strict=True)
    return freeze(model.to(device))


def read_emu_state(path: str) -> dict[str, torch.Tensor]:
    if os.path.isdir(path):  # one of our DCP checkpoints (root with `latest`, or iter_N/)
        from megatron_emu.convert.streams import DCPSource

        source = DCPSource(path)
        return source.read(list(source.entries))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: --emu-load does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a corrupt file
        raise ValueError(f"{path}: unreadable Emu state dict ({e.__class__.__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of Emu, got {type(state).__name__}")
    return state


def check_emu_state(state: dict, model: Emu, path: str) -> None:
    """Shape mismatches get named in one line (load_state_dict's message is a wall of text)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: not an Emu of this preset (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hidden = model.config.llm.hidden
    got = tuple(state["regression_head.weight"].shape)
    if got != (hidden, hidden):
        raise ValueError(f"{path}: Emu hidden size {got[0]} but the preset's is {hidden}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
