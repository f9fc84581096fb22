"""Instruction tuning starts from a pretrained Emu (--pretrained-checkpoint): its frozen base.

- The base is read from a DCP checkpoint at any layout into this run's parts (adapters
  are not in it). A base with base + 4 vocabulary rows (pretraining) grows by the two
  rows of [USER] / [ASSISTANT]: its rows are copied, the new ones are then set from the
  words "user" / "assistant" (training/instruct.py).
- Its identity (directory, iteration, a fingerprint of the checkpoint's files and a hash of
  its checksum record) is recorded in every adapter checkpoint; resuming, or generating, on
  top of another base is refused. The fingerprint hashes DCP's .metadata (every tensor's
  name, shape, dtype and byte range) with each file's name and size: a replaced or
  truncated base is caught without reading its gigabytes. Two bases of one model size and
  layout can share it, so `content` hashes checksums.json (the xxh3 of every file's bytes,
  written with each save and import): another base with the same shapes differs there.
  A record without `content` (adapters saved before it existed) is checked by fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.model.lora import is_lora_parameter
from megatron_emu.training.checkpoint_files import (
    check_model_config,
    iteration_dir,
    read_latest,
    read_run_config,
)
from megatron_emu.training.checksums import CHECKSUMS_NAME

log = logging.getLogger("megatron_emu")

VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")


def resolve_pretrained(path: str) -> str:
    """A checkpoint root (its latest iteration) or one iteration directory."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    iteration = read_latest(path) if os.path.isdir(path) else None
    if iteration is None or not os.path.exists(os.path.join(iteration_dir(path, iteration), ".metadata")):
        raise ValueError(f"--pretrained-checkpoint {path}: no checkpoint there (no .metadata, no latest iteration)")
    return iteration_dir(path, iteration)


def base_identity(path: str) -> dict:
    directory = resolve_pretrained(path)
    digest = hashlib.sha256()
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        digest.update(f.read())
    for name in sorted(os.listdir(directory)):
        digest.update(f"{name}:{os.path.getsize(os.path.join(directory, name))}\n".encode())
    checksums = os.path.join(directory, CHECKSUMS_NAME)
    content = None
    if os.path.exists(checksums):
        with open(checksums, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
    return {"directory": os.path.abspath(directory), "iteration": read_run_config(directory).get("iteration"),
            "fingerprint": digest.hexdigest(), "content": content}


def check_same_base(checkpoint_dir: str, recorded: dict | None, current: dict | None) -> None:
    if recorded is None or current is None:
        return
    contents = recorded.get("content"), current.get("content")
    if recorded["fingerprint"] != current["fingerprint"] or (None not in contents and contents[0] != contents[1]):
        raise ValueError(f"{checkpoint_dir}: adapters trained on base {recorded['directory']} ({_short(recorded)}), "
                         f"refusing --pretrained-checkpoint {current['directory']} ({_short(current)})")


def _short(identity: dict) -> str:
    content = identity.get("content")
    return f"fingerprint {identity['fingerprint'][:12]}" + (f", content {content[:12]}" if content else "")


def vocabulary_rows(path: str) -> int:
    """Rows of the base's token embedding (base + 4: pretrained Emu; base + 6: an Emu-I)."""
    saved = dcp.FileSystemReader(resolve_pretrained(path)).read_metadata().state_dict_metadata
    return int(saved[f"model.{VOCAB_ROWS[0]}"].size[0])


def _without_vocab(model: dict) -> dict:
    llm = {k: v for k, v in model["llm"].items() if k not in ("num_special_tokens",)}
    return {**model, "llm": llm}


@torch.no_grad()
def load_pretrained(path: str, parts, model_config: dict, process_group=None) -> dict:
    """Load the base weights of `parts` from `path`; returns the base's identity."""
    from megatron_emu.training.checkpoint_state import model_state

    directory = resolve_pretrained(path)
    record = read_run_config(directory)
    check_model_config(directory, _without_vocab(record["config"]["model"]), _without_vocab(model_config))
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    state = {k: v for k, v in model_state(parts).items() if not is_lora_parameter(k)}
    grown, sizes = {}, {}
    for key in VOCAB_ROWS:
        if key not in state or f"model.{key}" not in saved:
            continue
        rows = tuple(saved[f"model.{key}"].size)
        if rows != tuple(state[key].shape):
            if rows[1:] != tuple(state[key].shape[1:]) or rows[0] > state[key].shape[0]:
                raise ValueError(f"{directory}: {key} has shape {rows}, cannot grow into {tuple(state[key].shape)}")
            target = state.pop(key)
            grown[key] = torch.empty(rows, dtype=target.dtype)  # read whole on every rank
            sizes[key] = f"{rows[0]} -> {target.shape[0]}"
    dcp.load({"model": {**state, **grown}}, storage_reader=dcp.FileSystemReader(directory), process_group=process_group)
    for part in parts:
        set_model_state_dict(part, state, options=StateDictOptions(strict=False))
        params = {_clean(n): p for n, p in part.named_parameters()}
        for key, value in grown.items():
            if key in params:
                _copy_rows(params[key], value)
    if grown:
        log.info("base %s: vocabulary rows grown %s (rows of [USER] / [ASSISTANT] added)", directory, sizes)
    return base_identity(directory)


def _clean(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _copy_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    """param[:len(rows)] = rows, on a plain or a sharded (DTensor) parameter."""
    whole = param.full_tensor() if isinstance(param, DTensor) else param.data
    whole[: rows.shape[0]] = rows.to(whole.device, whole.dtype)
    if isinstance(param, DTensor):
        param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local())
