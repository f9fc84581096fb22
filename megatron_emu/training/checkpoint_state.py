"""What a checkpoint holds, gathered from and set back into live objects: model and
optimizer state keyed by fully-qualified parameter names (so DCP can reshard them to
another layout), optimizer hyper-parameters per parameter, and the RNG states.
training/checkpoint.py decides when and where they are saved and loaded.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------
# State gathering
# ---------------------------------------------------------------------------
def model_state(models) -> dict[str, Any]:
    """FQN -> tensor over all model parts of this rank (pipeline stages keep global names)."""
    state: dict[str, Any] = {}
    for model in as_list(models):
        state.update(get_model_state_dict(model))
    return state


# Wrappers that insert a name component without changing what a parameter is.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean_name(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name[len("module."):] if name.startswith("module.") else name  # DDP


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's moments for every parameter (a step with lr 0 and zero gradients),
    so a fresh optimizer has tensors for DCP to load into."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    grads = [p.grad for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if not torch.is_tensor(group["lr"]) else torch.zeros_like(group["lr"])
    for p in params:  # no gradient = skipped by the step: existing moments stay untouched
        p.grad = None if optimizer.state.get(p) else torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


# How the optimizer runs on this layout, not what it learned: foreach kernels are off
# with DTensors (TP, FSDP2) and on without, so they must never travel with a checkpoint.
_IMPLEMENTATION_KEYS = ("params", "foreach", "fused", "capturable", "differentiable")


def optimizer_state(models, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One optimizer over all of this rank's model parts, keyed by parameter name:
    `state.<fqn>.exp_avg` (the live tensors, so DCP loads in place) and
    `param_groups.<fqn>.lr` (hyper-parameters, per parameter, so stages split freely)."""
    names = {id(p): _clean_name(n) for model in as_list(models) for n, p in model.named_parameters()}
    _ensure_optimizer_state(optimizer)
    state: dict[str, Any] = {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k not in _IMPLEMENTATION_KEYS}
        for p in group["params"]:
            fqn = names[id(p)]
            for key, value in optimizer.state[p].items():
                state[f"state.{fqn}.{key}"] = value
            for key, value in hyper.items():
                state[f"param_groups.{fqn}.{key}"] = value
    return state


def set_optimizer_hyperparameters(models, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Moments were loaded in place; copy the loaded hyper-parameters back into the groups."""
    names = {id(p): _clean_name(n) for model in as_list(models) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        first = names[id(group["params"][0])]
        for key in [k for k in group if k not in _IMPLEMENTATION_KEYS]:
            group[key] = state[f"param_groups.{first}.{key}"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
