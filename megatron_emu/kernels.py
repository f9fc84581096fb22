"""Fused norm kernels, and whether apex is there (DESIGN.md decision 4).

apex (from the NGC image) when installed on CUDA, torch's own fused kernels otherwise:
  RMSNorm    apex fused_rms_norm_affine  ->  torch.nn.functional.rms_norm
  LayerNorm  apex fused_layer_norm_affine ->  torch's LayerNorm (already one fused kernel)
  AdamW      apex FusedAdam(adam_w_mode)  ->  torch AdamW(fused=True) (CUDA and CPU):
             built by training/optim.py's build_optimizer, the one optimizer builder.
The attention kernel is chosen in model/attention.py.

Norms are switched from outside the model by giving each norm module a fused
`forward`; parameters, names and state dicts are untouched, and the class stays the
model's own (init, TP plans and checkpoint converters key on it).

Under tensor / data parallelism (DTensor parameters and activations):
- torch's rms_norm dispatches on DTensors (sequence-parallel norms get Shard(1) inputs
  and a replicated weight); apex's autograd functions take plain tensors only, so a
  norm whose weight is a DTensor keeps torch's kernel (logged).
- AdamW is torch's fused (or foreach) kernel over param groups split by device mesh
  (optim.split_by_mesh); apex FusedAdam does not take DTensors.
"""

import importlib.util
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_emu.model.norms import RMSNorm

log = logging.getLogger("megatron_emu")


def apex_available(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("apex") is not None


# -- norms --------------------------------------------------------------------------
def _torch_rms_norm_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # Same numerics as RMSNorm.forward: normalise in fp32, cast back, then scale.
    if x.dtype == self.weight.dtype == torch.float32:
        # In fp32 torch's kernel computes the same products bit for bit, and scales in
        # place: no separate scale op, no extra copy of the activations. (In bf16 it
        # scales before rounding, which differs from RMSNorm.forward in the last bit.)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
    return self.weight * y


def _apex_rms_norm_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, self.weight, (x.shape[-1],), self.eps)


def _apex_layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    return fused_layer_norm_affine(x, self.weight, self.bias, self.normalized_shape, self.eps)


def apply_fused_norms(model: nn.Module, device_type: str) -> str:
    """Give every RMSNorm / LayerNorm a fused forward; returns the kernel family used."""
    use_apex = apex_available(device_type)
    on_dtensor = 0  # norms left on torch's kernel because apex cannot take their DTensors
    for module in model.modules():
        if not isinstance(module, (RMSNorm, nn.LayerNorm)):
            continue
        apex_here = use_apex and not isinstance(module.weight, DTensor)
        on_dtensor += use_apex and not apex_here
        if isinstance(module, RMSNorm):
            forward = _apex_rms_norm_forward if apex_here else _torch_rms_norm_forward
            module.forward = types.MethodType(forward, module)
        elif apex_here:
            module.forward = types.MethodType(_apex_layer_norm_forward, module)
    family = "apex" if use_apex else "torch"
    log.info("fused norms: %s%s", family, f" ({on_dtensor} DTensor norms on torch's kernel)" if on_dtensor else "")
    return family
