"""Mixed precision: bf16 / fp16 compute, fp32 master weights, fp32 gradient reduction.

Parameters and their gradients stay fp32 (they are the master weights, and data
parallel reduces fp32 gradients); matmuls run in the compute dtype under autocast.
With FSDP2 the same contract is `fsdp_policy()`: bf16 parameters gathered for
compute, fp32 gradient reduce-scatter. fp16 adds loss scaling (dynamic by default,
`--loss-scale` for a static scale): steps whose gradients overflow are skipped.

Usage in the loop (training/train.py):
    with precision.autocast():  loss = ...
    precision.backward(loss)
    grad_norm, stepped = precision.clip_and_step(optimizer, params, max_norm)
"""

import contextlib
import logging

import torch

from megatron_emu.config import PerformanceConfig

log = logging.getLogger("megatron_emu")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    def __init__(self, config: PerformanceConfig, device_type: str):
        self.config = config
        self.device_type = device_type
        self.dtype = DTYPES[config.compute_dtype]
        self.scaler = torch.amp.GradScaler(
            device_type,
            init_scale=config.loss_scale or config.initial_loss_scale,
            growth_interval=config.loss_scale_window,
            enabled=config.fp16,
        )
        log.info("precision: %s compute, fp32 master weights and gradients%s", config.compute_dtype,
                 ", loss scaling" if config.fp16 else "")

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        """Forward + loss in the compute dtype; a no-op in fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # scale() is the identity unless fp16

    def clip_and_step(self, optimizer, params: list, max_norm: float) -> tuple[float, bool]:
        """Unscale, clip by global norm, step unless fp16 gradients overflowed.

        Returns (grad_norm before clipping, whether the optimizer stepped)."""
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not self.config.fp16:
            optimizer.step()
            return grad_norm.item(), True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)  # skipped when any gradient is inf/nan
        self.scaler.update(self.config.loss_scale)  # None = dynamic; a number pins it
        stepped = self.scaler.get_scale() >= scale if self.config.loss_scale is None else bool(
            torch.isfinite(grad_norm))
        return grad_norm.item(), stepped

    def fsdp_policy(self):
        """FSDP2 MixedPrecisionPolicy: gather params in the compute dtype, reduce in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
