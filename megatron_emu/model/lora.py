"""LoRA (Hu et al. 2021) on the LLM's self-attention, the paper's Emu-I adaptation (section 4).

Each adapted projection W (out, in) gains a low-rank update:
    y = W x + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)
B starts at zero, so the adapted model begins exactly as the base model. Only A and B
train; everything else is frozen.

Applied from outside, like the parallel plans: the adapter lives beside the frozen
nn.Linear as its child `lora` and joins through a forward hook, so the base weights
keep their names (`llm.layers.0.attention.wq.weight`) and every plan, checkpoint
and converter keyed by name sees the same model. The hook sees the layer's input and
output after any tensor-parallel hooks: parallel/lora.py gives A and B placements that
match the base's column / row split, and `output_placement` says how the update must
be laid out to add to the base's local output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The paper adapts q, k, v, o of every LLaMA layer and nothing else (no vision encoder).
LORA_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0


class LoRA(nn.Module):
    """The low-rank update of one nn.Linear; its output is added to the Linear's."""

    def __init__(self, in_features: int, out_features: int, spec: LoRASpec):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(spec.rank, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, spec.rank))  # (out, r)
        self.scaling = spec.alpha / spec.rank
        self.rank = spec.rank
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.output_placement = None  # tensor parallel: how the update adds to the base output

    def init_rules(self, std: float) -> dict:
        """B = 0 (the adapted model starts as the base); A ~ N(0, 1/r), PEFT's gaussian init."""
        return {"lora_A": ("normal", 1.0 / self.rank), "lora_B": ("zeros", 0.0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return F.linear(low, self.lora_B) * self.scaling  # (..., out)


def _add_update(linear: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    update = linear.lora(args[0])
    if linear.lora.output_placement is not None:  # DTensor under TP: lay out like the base output
        update = update.redistribute(update.device_mesh, [linear.lora.output_placement]).to_local()
    return output + update


def lora_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Name -> the nn.Linear LoRA adapts (the LLM's q, k, v, o), wherever the stage holds layers."""
    llm = getattr(model, "llm", None)
    if llm is None or llm.layers is None:
        return {}
    out = {}
    for index, layer in llm.layers.items():
        for target in LORA_TARGETS:
            out[f"llm.layers.{index}.{target}"] = layer.get_submodule(target)
    return out


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Freeze every parameter of `model`, give q, k, v, o adapters; returns the adapters'
    parameter names. Adapters are created on the device (and in the dtype) of the base."""
    for param in model.parameters():
        param.requires_grad_(False)
    names = []
    for name, linear in lora_layers(model).items():
        if hasattr(linear, "lora"):
            raise ValueError(f"{name}: already has a LoRA adapter")
        weight = linear.weight
        with torch.device(weight.device):
            linear.lora = LoRA(linear.in_features, linear.out_features, spec).to(weight.dtype)
        linear.lora.hook = linear.register_forward_hook(_add_update)
        names += [f"{name}.lora.lora_A", f"{name}.lora.lora_B"]
    return names


def is_lora_parameter(name: str) -> bool:
    return ".lora.lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if is_lora_parameter(n)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """W += (alpha / r) B A for every adapter, then drop the adapters and their hooks;
    returns how many were merged. Plain (unsharded) modules only."""
    merged = 0
    for name, linear in lora_layers(model).items():
        lora = getattr(linear, "lora", None)
        if lora is None:
            continue
        delta = (lora.lora_B.float() @ lora.lora_A.float()) * lora.scaling  # (out, in)
        linear.weight.add_(delta.to(linear.weight.dtype))
        lora.hook.remove()
        del linear.lora
        merged += 1
    return merged
