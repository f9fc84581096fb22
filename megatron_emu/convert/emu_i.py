"""The released Emu-I checkpoint (paper section 4) -> the Emu v1 layout that keys.py maps.

Emu-I is a whole Emu whose LLM was instruction-tuned with PEFT LoRA (r 16, alpha 16 on
q, k, v, o; the official inference code wraps `model.decoder.lm` with `get_peft_model`
before loading the state dict) and whose vocabulary has grown by [USER] and [ASSISTANT]
(32004, 32005: embedding and LM head of 32006 rows). Its LLM keys are therefore PEFT's:

    decoder.lm.base_model.model.model.layers.N.self_attn.q_proj[.base_layer].weight
    decoder.lm.base_model.model.model.layers.N.self_attn.q_proj.lora_A[.default].weight   (r, in)
    decoder.lm.base_model.model.model.layers.N.self_attn.q_proj.lora_B[.default].weight   (out, r)
    decoder.lm.base_model.model.{lm_head,stu_regress_head,model.embed_tokens}.weight

(`.base_layer` and the adapter name `.default` depend on the PEFT version that saved it).
`merge_peft_lora` unwraps the names and folds each adapter into its projection,
W + (alpha / r) B A, so the import yields the Emu v1 names with merged weights; a checkpoint
saved after merging (plain `decoder.lm.*` names) passes through unchanged. The LoRA alpha is
not in the state dict: the release's 16 unless told otherwise (--lora-alpha).
"""

from __future__ import annotations

import re

import torch

EMU_I_LORA_ALPHA = 16.0  # the official Emu-I LoraConfig (r 16, alpha 16)
_PEFT_PREFIX = "decoder.lm.base_model.model."
_LORA = re.compile(r"^(?P<linear>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_NAMES = ("decoder.lm.model.embed_tokens.weight", _PEFT_PREFIX + "model.embed_tokens.weight")


def unwrap_peft_name(name: str) -> str:
    """PEFT's wrapping removed: decoder.lm.base_model.model.X -> decoder.lm.X, no .base_layer."""
    if name.startswith(_PEFT_PREFIX):
        name = "decoder.lm." + name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def embedding_rows(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Rows of the LLM's token embedding in an Emu v1 / Emu-I state dict (None: not there)."""
    for name in _EMBEDDING_NAMES:
        if name in shapes:
            return shapes[name][0]
    return None


def _adapters(source, path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Projection weight name (unwrapped) -> {"A": (r, in), "B": (out, r)}; both halves required."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in source.shapes():  # from the index: only the adapters are read
        m = _LORA.match(unwrap_peft_name(name))
        if m:
            found.setdefault(m["linear"] + ".weight", {})[m["half"]] = source.get(name)
    for weight, halves in found.items():
        if set(halves) != {"A", "B"}:
            raise ValueError(f"{path}: LoRA of {weight} has lora_{''.join(halves)} without lora_{'B' if 'A' in halves else 'A'}")
        if halves["A"].shape[0] != halves["B"].shape[1]:
            raise ValueError(f"{path}: LoRA of {weight}: lora_A {tuple(halves['A'].shape)} and lora_B "
                             f"{tuple(halves['B'].shape)} disagree on the rank")
    return found


def merge_peft_lora(source, path: str, lora_alpha: float = EMU_I_LORA_ALPHA):
    """(name, tensor) of `source` with PEFT names unwrapped and LoRA folded into its weights.
    The adapters (small) are read first, by name; then every other tensor streams past."""
    adapters = _adapters(source, path)
    merged = set()
    for name, tensor in source:
        name = unwrap_peft_name(name)
        if _LORA.match(name):
            continue
        if name in adapters:
            a, b = adapters[name]["A"].float(), adapters[name]["B"].float()  # (r, in), (out, r)
            if tensor.shape != (b.shape[0], a.shape[1]):
                raise ValueError(f"{path}: LoRA of {name} is {b.shape[0]}x{a.shape[1]}, the weight {tuple(tensor.shape)}")
            tensor = (tensor.float() + (lora_alpha / a.shape[0]) * (b @ a)).to(tensor.dtype)
            merged.add(name)
        yield name, tensor
    missing = sorted(set(adapters) - merged)
    if missing:
        raise ValueError(f"{path}: LoRA adapters of {len(missing)} weights the checkpoint lacks, e.g. {missing[0]}")
