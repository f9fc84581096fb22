"""Weight initialisation, one parameter at a time, each from its own seed.

Parameter `name` is drawn from a generator seeded by (seed, name). The values then depend
neither on the order parameters are initialised in nor on which of them a process holds:
the single-process model, a pipeline stage and a tensor- or FSDP-sharded rank get the
same numbers for the same name. A sharded rank draws one whole parameter at a time and
keeps its shard, so initialising emu-14b needs the largest parameter (the 32000 x 5120
embedding) in transient memory, not the model or the stage (parallel/parallelize.py).

Rules: Linear / Conv2d / Embedding weights N(0, init_std) and biases 0, LayerNorm and
RMSNorm weights 1 and biases 0; a module's `init_stds(std)` (EVA's cls / position
embeddings, T5's scaled init in the Causal Former) overrides them for its parameters.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.model.norms import RMSNorm

NORMAL, ZEROS, ONES = "normal", "zeros", "ones"


def init_plan(model: nn.Module, std: float) -> dict[str, tuple[str, float]]:
    """Parameter name -> (NORMAL, std) | (ZEROS, 0) | (ONES, 0)."""
    plan: dict[str, tuple[str, float]] = {}
    modules = list(model.named_modules())
    for prefix, module in modules:
        full = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            plan[full("weight")] = (NORMAL, std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            plan[full("weight")] = (ONES, 0.0)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            plan[full("bias")] = (ZEROS, 0.0)
    for prefix, module in modules:  # a module's own stds win over the generic rules
        if hasattr(module, "init_stds"):
            plan.update({f"{prefix}.{name}" if prefix else name: (NORMAL, s) for name, s in module.init_stds(std).items()})
        if hasattr(module, "init_rules"):  # any rule, e.g. LoRA's B = 0 (model/lora.py)
            plan.update({f"{prefix}.{name}" if prefix else name: rule for name, rule in module.init_rules(std).items()})
    return plan


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, seed: int, names: set[str] | None = None) -> None:
    """Initialise every parameter of `model` (or those in `names`) in place, sharded or not."""
    plan = init_plan(model, std)
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        if name not in plan:
            raise ValueError(f"{name}: no initialisation rule (add it to the module's init_stds)")
        kind, value = plan[name]
        local = param.to_local() if isinstance(param, DTensor) else param
        whole = torch.empty(param.shape, dtype=param.dtype, device=local.device)  # (global shape)
        if kind == NORMAL:
            generator = torch.Generator(device=whole.device).manual_seed(parameter_seed(seed, name))
            whole.normal_(0.0, value, generator=generator)
        else:
            whole.fill_(1.0 if kind == ONES else 0.0)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank slices its own copy, no communication.
            whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
        local.copy_(whole)
