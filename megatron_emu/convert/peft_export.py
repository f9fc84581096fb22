"""LoRA adapters -> a PEFT adapter directory (tools/convert_checkpoint.py --to peft).

Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained`
loads on top of our Hugging Face export (`--to hf`) of the base: transformers'
LlamaForCausalLM with q_proj / k_proj / v_proj / o_proj. Our A (r, in) and B (out, r) are
PEFT's lora_A.weight and lora_B.weight as they are; PEFT scales by lora_alpha / r too.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp

from megatron_emu.convert.keys import llama_to_hf
from megatron_emu.convert.streams import atomic_output_dir
from megatron_emu.model.lora import is_lora_parameter
from megatron_emu.training.checkpoint_files import read_run_config
from megatron_emu.training.pretrained import resolve_pretrained

PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peft_name(name: str) -> str:
    """llm.layers.3.attention.wq.lora.lora_A -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    linear, _, half = name.rpartition(".lora.")
    hf = llama_to_hf(linear + ".weight")
    if hf is None:
        raise ValueError(f"{name}: not an adapter of the LLM")
    return f"base_model.model.{hf[: -len('.weight')]}.{half}.weight"


def read_adapters(checkpoint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapters of an instruction-tuning checkpoint (root or iteration), and its run config."""
    directory = resolve_pretrained(checkpoint)
    record = read_run_config(directory)
    lora = record["config"].get("lora", {})
    if not lora.get("rank"):
        raise ValueError(f"{directory}: not an instruction-tuning (LoRA) checkpoint")
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    state = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.items() if k.startswith("model.") and is_lora_parameter(k)}
    if not state:
        raise ValueError(f"{directory}: holds no adapters")
    dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(directory))
    return state, record


def export_peft(checkpoint: str, output: str, base_model: str = "") -> None:
    from safetensors.torch import save_file

    state, record = read_adapters(checkpoint)
    lora = record["config"]["lora"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"], "target_modules": PEFT_TARGETS, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model or None,
        "modules_to_save": None, "init_lora_weights": True,
    }
    with atomic_output_dir(output) as tmp:  # whole or not at all, as every export
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file({peft_name(n): t.contiguous() for n, t in state.items()}, os.path.join(tmp, "adapter_model.safetensors"))
