"""The layout of an Emu export (what export.py writes; what the hf-emu import and inference
read): a transformers LlamaForCausalLM directory (the LLM) with `visual/` beside it (EVA ViT,
ln_visual, Causal Former, regression head as safetensors + our whole model config)."""

from __future__ import annotations

import os

import torch

from megatron_emu.config import ModelConfig
from megatron_emu.convert.keys import hf_to_llama
from megatron_emu.convert.streams import SafetensorsSource
from megatron_emu.files import read_json

VISUAL_DIR = "visual"
VISUAL_FORMAT = "megatron_emu.emu-visual/1"


def read_visual_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, VISUAL_DIR, "config.json")
    record = read_json(path, "not an Emu export")
    if record.get("format") != VISUAL_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {VISUAL_FORMAT!r}")
    return ModelConfig.from_dict(record["model"])


def hf_emu_tensors(directory: str, spans: bool = False):
    """(our name, tensor) for every tensor of an export; with spans=True (our name, FileSpan):
    where the bytes lie, nothing read (SafetensorsSource.spans)."""
    llm, visual = SafetensorsSource(directory), SafetensorsSource(os.path.join(directory, VISUAL_DIR))
    for name, tensor in llm.spans() if spans else llm:
        ours = hf_to_llama(name)
        if ours is None:
            raise ValueError(f"{directory}: unexpected tensor {name}")
        yield ours, tensor
    yield from visual.spans() if spans else visual


@torch.no_grad()
def load_emu_from_hf(directory: str, device: str = "cpu"):
    """The whole Emu from an export directory (for inference), with the config it was saved with."""
    from megatron_emu.model.emu import build_emu

    model = build_emu(read_visual_config(directory), device=device, seed=0)
    params = dict(model.named_parameters())
    filled = set()
    for name, tensor in hf_emu_tensors(directory):
        if name not in params or params[name].shape != tensor.shape:
            need = f"the model needs {tuple(params[name].shape)}" if name in params else "the model has no such tensor"
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, {need}")
        params[name].copy_(tensor)
        filled.add(name)
    missing = [n for n in params if n not in filled]
    if missing:
        raise ValueError(f"{directory}: lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:3])}")
    return model
