"""AdamW with per-module learning rates, no decay on norms/biases/position tables,
and Megatron's warmup + decay schedule. `build_optimizer` is the one optimizer builder:
pretraining, the benchmark and the tests all get their AdamW from it."""

import dataclasses
import logging
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_emu.config import OptimizerConfig
from megatron_emu.kernels import apex_available

log = logging.getLogger("megatron_emu")

# Parameters with fewer than 2 dims (norm weights, biases) never decay; neither do
# these learned tables, which play the role of positions / fixed tokens.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "query_embeds", "relative_attention_bias")


def module_family(name: str) -> str:
    """Which learning rate a parameter uses: vision (EVA + ln_visual), causal_former
    (with the randomly initialised regression head, spec section 5), or llm."""
    if name.startswith(("visual.", "ln_visual.")):
        return "vision"
    if name.startswith(("causal_former.", "regression_head.")):
        return "causal_former"
    return "llm"


def family_lrs(config: OptimizerConfig) -> dict[str, float]:
    return {
        "llm": config.lr,
        "vision": config.lr if config.lr_vision is None else config.lr_vision,
        "causal_former": config.lr if config.lr_causal_former is None else config.lr_causal_former,
    }


def apply_freezing(model: nn.Module, config: OptimizerConfig) -> None:
    frozen = {"vision": config.freeze_vision, "causal_former": config.freeze_causal_former, "llm": config.freeze_llm}
    for name, param in model.named_parameters():
        if frozen[module_family(name)]:
            param.requires_grad_(False)


def param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """One group per (module family, decay or not); each carries its peak `max_lr`."""
    lrs = family_lrs(config)
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        family = module_family(name)
        decays = param.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
        key = (family, decays)
        if key not in groups:
            groups[key] = {
                "name": f"{family}{'' if decays else '.no_decay'}",
                "params": [],
                "lr": lrs[family],
                "max_lr": lrs[family],
                "weight_decay": config.weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def split_by_mesh(groups: list[dict]) -> list[dict]:
    """Each param group split into one group per device mesh (plain tensors: one more),
    with the same hyper-parameters: foreach / fused kernels then see one mesh per call
    (DTensor dispatch cannot mix meshes, or DTensors and plain tensors, in one call)."""
    split = []
    for group in groups:
        by_mesh: dict = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split += [{**group, "params": params} for params in by_mesh.values()]
    return split


def build_optimizer(parts: nn.Module | list[nn.Module], config: OptimizerConfig, fused: bool = False,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """One AdamW over every model part of this rank (plain or DTensor parameters), its
    groups named by module family (param_groups) and split by device mesh.

    fused (--fused kernels, kernels.py): apex FusedAdam (AdamW mode) on CUDA when apex is
    installed and no parameter is a DTensor (apex takes plain tensors only), else torch's
    fused AdamW; not fused: torch's foreach AdamW."""
    parts = parts if isinstance(parts, list) else [parts]
    groups = split_by_mesh([group for part in parts for group in param_groups(part, config)])
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    plain = not any(isinstance(p, DTensor) for group in groups for p in group["params"])
    if fused and plain and apex_available(device_type):
        from apex.optimizers import FusedAdam

        log.info("optimizer: apex FusedAdam (AdamW mode) over %d param groups", len(groups))
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    log.info("optimizer: torch AdamW (%s) over %d param groups", "fused" if fused else "foreach", len(groups))
    return torch.optim.AdamW(groups, fused=fused or None, foreach=None if fused else True, **kwargs)


def lr_factor(iteration: int, config: OptimizerConfig, train_iters: int) -> float:
    """Fraction of the peak rate at `iteration`: linear warmup, then decay to min_lr / lr."""
    if config.lr_warmup_iters > 0 and iteration < config.lr_warmup_iters:
        return (iteration + 1) / config.lr_warmup_iters
    min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
    decay_iters = config.lr_decay_iters or train_iters
    span = max(decay_iters - config.lr_warmup_iters, 1)
    progress = min(max(iteration - config.lr_warmup_iters, 0) / span, 1.0)
    if config.lr_decay_style == "constant":
        decay = 1.0
    elif config.lr_decay_style == "linear":
        decay = 1.0 - progress
    elif config.lr_decay_style == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown --lr-decay-style {config.lr_decay_style!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def schedule_settings(config: OptimizerConfig, train_iters: int) -> dict:
    """What the schedule depends on, keyed by the attribute of OptimizerConfig (= the flag)."""
    lrs = family_lrs(config)
    return {
        "lr": config.lr, "lr_vision": lrs["vision"], "lr_causal_former": lrs["causal_former"],
        "min_lr": config.min_lr, "lr_warmup_iters": config.lr_warmup_iters,
        "lr_decay_style": config.lr_decay_style, "lr_decay_iters": config.lr_decay_iters or train_iters,
        "weight_decay": config.weight_decay,
    }


class LRScheduler:
    """Sets every group's lr to max_lr * factor(iteration); min_lr scales with each group's peak.

    The factor is a function of the iteration number: a skipped (non-finite) step still uses
    up its iteration, so the schedule stays where --train-iters expects it (Megatron instead
    holds its scheduler on a skipped step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig, train_iters: int):
        self.optimizer, self.config, self.train_iters = optimizer, config, train_iters
        # The flags' per-group peaks and decays, to restore over a checkpoint's (--override-opt-param-scheduler).
        self._flag_groups = [(group["max_lr"], group["weight_decay"]) for group in optimizer.param_groups]
        self.iteration = 0
        self.step(0)

    def step(self, iteration: int) -> None:
        self.iteration = iteration
        factor = lr_factor(iteration, self.config, self.train_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = group["max_lr"] * factor

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "settings": schedule_settings(self.config, self.train_iters)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved iteration. The optimizer's groups were loaded with the checkpoint's
        peaks and decays; a setting that differs from the flags is an error naming the flag unless
        --override-opt-param-scheduler (the flags win) or --use-checkpoint-opt-param-scheduler."""
        saved = state.get("settings")
        if saved is not None:
            self._reconcile(saved)
        self.step(state["iteration"])

    def _reconcile(self, saved: dict) -> None:
        c = self.config
        current = schedule_settings(c, self.train_iters)
        differ = {k: (saved[k], current[k]) for k in current if k in saved and saved[k] != current[k]}
        if c.override_opt_param_scheduler:
            for group, (max_lr, weight_decay) in zip(self.optimizer.param_groups, self._flag_groups):
                group["max_lr"], group["weight_decay"] = max_lr, weight_decay
            if differ:
                log.info("--override-opt-param-scheduler: the flags' schedule replaces the checkpoint's (%s)",
                         ", ".join(differ))
        elif c.use_checkpoint_opt_param_scheduler:
            self.config = dataclasses.replace(c, **{k: saved[k] for k in current if k in saved})
        elif differ:
            shown = "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the LR schedule differs from the checkpoint's: {shown}; pass "
                             f"--override-opt-param-scheduler to use the flags or --use-checkpoint-opt-param-scheduler "
                             f"to keep the checkpoint's")
