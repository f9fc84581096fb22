"""The checkpoint directory on disk: names, the atomic `latest` tracker, and the checks
that turn a wrong or damaged checkpoint into one clear error before DCP reads it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch

from megatron_emu.config import ModelConfig
from megatron_emu.files import write_text_atomic

LATEST_NAME = "latest_checkpointed_iteration.txt"  # Megatron-LM's tracker file
RUN_CONFIG_NAME = "run_config.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def list_iterations(root: str) -> list[int]:
    """Complete iteration directories (never `.tmp` ones), oldest first."""
    if not os.path.isdir(root):
        return []
    found = (_ITER_RE.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m)


def write_latest(root: str, iteration: int) -> None:
    """Readers see the old or the new value, never half (its `.tmp.<pid>` file is what
    checkpoint_guard sweeps after a kill)."""
    write_text_atomic(os.path.join(root, LATEST_NAME), str(iteration))


def read_latest(root: str) -> int | None:
    path = os.path.join(root, LATEST_NAME)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def read_run_config(directory: str) -> dict:
    path = os.path.join(directory, RUN_CONFIG_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{directory}: not a megatron_emu checkpoint ({RUN_CONFIG_NAME} is missing)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (with the prefix): nested configs compared field by field."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def recorded_model_config(path: str) -> ModelConfig:
    """The model config a checkpoint (a root with `latest`, or an iteration directory) was saved with."""
    directory = path
    if not os.path.exists(os.path.join(path, ".metadata")):
        iteration = read_latest(path) if os.path.isdir(path) else None
        if iteration is None:
            raise ValueError(f"{path}: no checkpoint there to take the model config from (no .metadata, no latest iteration)")
        directory = iteration_dir(path, iteration)
    return ModelConfig.from_dict(read_run_config(directory)["config"]["model"])


def check_model_config(directory: str, saved: dict, current: dict) -> None:
    """The model must match (shapes, and what it computes: norm eps, rope): name every field that differs."""
    a, b = flatten(saved, "model."), flatten(current, "model.")
    newer = {k: v for k, v in flatten(dataclasses.asdict(ModelConfig()), "model.").items() if k in b and k not in a}
    a.update(newer)  # fields the checkpoint predates (e.g. rope_type): their defaults
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs this run {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"{directory}: model config differs from this run's: {'; '.join(diffs)} "
                         "(--use-checkpoint-args takes the checkpoint's)")


def check_shards(directory: str, metadata) -> None:
    """Every file DCP's .metadata refers to exists and is long enough."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise ValueError(f"{directory}: shard {name} is missing (the checkpoint was not copied completely)")
        if os.path.getsize(path) < size:
            raise ValueError(f"{path}: shard is truncated ({os.path.getsize(path)} bytes, needs {size})")


def _global_shape(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):  # DTensor.shape is the global shape
        return tuple(value.shape)
    return None


def check_state_keys(directory: str, metadata, state: dict, saved_layout: dict, layout) -> None:
    """Everything this rank needs is in the checkpoint with the same global shape."""
    stored = metadata.state_dict_metadata
    missing, mismatched = [], []
    for key, value in flatten(state).items():
        if key not in stored:
            missing.append(key)
            continue
        shape = _global_shape(value)
        saved_shape = tuple(getattr(stored[key], "size", ()) or ())
        if shape is not None and saved_shape and shape != saved_shape:
            mismatched.append(f"{key}: checkpoint {saved_shape} vs this run {shape}")
    where = f"saved at TP{saved_layout.get('tp', '?')} PP{saved_layout.get('pp', '?')} DP{saved_layout.get('dp', '?')}, loading at TP{layout.tp} PP{layout.pp} DP{layout.dp}"
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        hint = " (it holds no optimizer state: pass --no-load-optim or --finetune)" if all(m.startswith("optim.") for m in missing) else ""
        raise ValueError(f"{directory}: cannot load ({where}): the checkpoint lacks {shown}{hint}")
    if mismatched:
        raise ValueError(f"{directory}: cannot load ({where}): shapes differ: {'; '.join(mismatched[:3])}")
