"""Mixed precision: bf16 / fp16 compute, fp32 master weights, fp32 gradient reduction.

Parameters and their gradients stay fp32 (they are the master weights, and data
parallel reduces fp32 gradients); matmuls run in the compute dtype under autocast.
With FSDP2 the same contract is its MixedPrecisionPolicy (parallel/data_parallel.py,
given `Precision.dtype`): bf16 parameters gathered for compute, fp32 gradient reduce-scatter. fp16 adds loss scaling (dynamic by default,
`--loss-scale` for a static scale): steps whose gradients overflow are skipped.

Usage in the loop (training/train.py):
    with precision.autocast():  loss = ...
    precision.backward(loss)
    precision.unscale_(optimizer); clip the gradients; precision.step(optimizer)
"""

import contextlib
import logging

import torch
import torch.distributed as dist

from megatron_emu.config import PerformanceConfig

log = logging.getLogger("megatron_emu")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    def __init__(self, config: PerformanceConfig, device_type: str):
        self.config = config
        self.device_type = device_type
        self.dtype = DTYPES[config.compute_dtype]
        # Ranks must agree on skipping a step: the sharded scaler all-reduces found-inf.
        scaler_class = torch.amp.GradScaler
        if config.fp16 and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as scaler_class
        self.scaler = scaler_class(
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

    def unscale_(self, optimizer) -> None:
        """Divide the gradients by the loss scale (before clipping); a no-op unless fp16."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer, skip: bool = False) -> bool:
        """optimizer.step() unless `skip` (a non-finite step) or fp16 gradients overflowed;
        returns whether it stepped. fp16 updates the loss scale either way."""
        if not self.config.fp16:
            if not skip:
                optimizer.step()
            return not skip
        if skip:  # found-inf was recorded by unscale_: update() lowers the scale after it
            self.scaler.update(self.config.loss_scale)
            return False
        # Filled by unscale_ (called before clipping): one flag per device.
        found_inf = sum(v.item() for v in self.scaler._found_inf_per_device(optimizer).values())
        self.scaler.step(optimizer)  # skipped when any gradient is inf/nan
        self.scaler.update(self.config.loss_scale)  # None = dynamic; a number pins it
        return found_inf == 0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
