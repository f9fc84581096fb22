"""Public checkpoints -> our DCP checkpoint (`--load DIR --finetune --use-checkpoint-args` trains from it).

Kinds: hf-llama (transformers LLaMA dir: the LLM; embedding and LM head grown for the
added tokens, new rows = mean of the old ones; its config.json's norm eps and rope carried,
hf_llama_config.py), eva-clip (the ViT, fused qkv split; any EVA-CLIP / open_clip layout),
emu-v1 (the official Emu v1 release, whole model; also the released Emu-I: its PEFT LoRA
merged on the way, convert/emu_i.py, and its 32006-row vocabulary imported as Emu-I's six
added tokens), hf-emu (our own export_hf output).
Modules no source provides get a fresh initialisation (seeded, family by family).
Streaming: the model is never held whole; source tensors go out in groups of about
--max-shard-size (convert/dcp_writer.py). Safetensors inputs whose tensors pass through
unchanged (hf-llama, hf-emu: renames only) are not read up front: each comes as a
FileSpan and is copied from its file with O_DIRECT as its group is written; the ones
converted (vocab grown, dtype cast) are read first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle

import torch
from tqdm import tqdm

from megatron_emu.config import LLAMA_FUNCTION_FIELDS, NUM_INSTRUCT_SPECIAL_TOKENS, ModelConfig
from megatron_emu.convert.dcp_writer import GroupedDCPWriter
from megatron_emu.convert.emu_i import EMU_I_LORA_ALPHA, embedding_rows, merge_peft_lora
from megatron_emu.direct_io import FileSpan
from megatron_emu.convert.hf_emu import hf_emu_tensors, read_visual_config
from megatron_emu.convert.hf_llama_config import llm_config_from_hf
from megatron_emu.convert.keys import emu_v1_to_ours, eva_to_ours, hf_to_llama
from megatron_emu.convert.streams import SafetensorsSource, atomic_output_dir, open_source
from megatron_emu.data.tokenizer import resize_token_embeddings
from megatron_emu.model.emu import build_emu
from megatron_emu.model.init import init_parameters
from megatron_emu.training.checkpoint_files import RUN_CONFIG_NAME, flatten, iteration_dir, write_latest

log = logging.getLogger("megatron_emu")

KINDS = ("hf-llama", "eva-clip", "emu-v1", "hf-emu")
# Which of our modules each kind must fill completely.
_REQUIRED = {"hf-llama": ("llm.",), "eva-clip": ("visual.",), "emu-v1": ("",), "hf-emu": ("",)}
_VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")


def source_config(inputs: list[tuple[str, str]], config: ModelConfig) -> ModelConfig:
    """The preset with what the inputs' own configs carry (rope, norm epsilon): a LLaMA's
    config.json (hf_llama_config.py) or our export's; a different size is refused."""
    for kind, path in inputs:
        if kind == "hf-llama":
            llm = llm_config_from_hf(path, config.llm)
        elif kind == "hf-emu":
            llm = _carried_from_export(path, config)
        else:
            continue  # a bare state dict (EVA-CLIP, Emu v1) states no config
        changed = [f"{f} {getattr(llm, f)!r} (preset {getattr(config.llm, f)!r})"
                   for f in LLAMA_FUNCTION_FIELDS if getattr(llm, f) != getattr(config.llm, f)]
        if changed:
            log.info("%s: carried from its config: %s", path, ", ".join(changed))
        config = dataclasses.replace(config, llm=llm)
    return config


def _carried_from_export(path: str, config: ModelConfig):
    saved = read_visual_config(path)
    llm = dataclasses.replace(config.llm, **{f: getattr(saved.llm, f) for f in LLAMA_FUNCTION_FIELDS})
    a, b = flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(dataclasses.replace(config, llm=llm)))
    diffs = [f"{k}: export {a[k]!r} vs preset {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diffs:
        raise ValueError(f"{path}: exported from another model config: {'; '.join(diffs)}")
    return llm


def _fit_vocab(name: str, tensor: torch.Tensor, target: torch.Tensor, where: str, llm) -> torch.Tensor:
    """Grow a base-vocabulary embedding / LM head by the added tokens (mean of old rows)."""
    if name in _VOCAB_ROWS and tensor.shape[0] != target.shape[0]:
        if tensor.shape[0] not in (llm.base_vocab_size, llm.vocab_size) or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{where}: vocab mismatch: {tensor.shape[0]} rows, the model has "
                             f"{llm.base_vocab_size} pieces + {llm.num_special_tokens} added tokens")
        # Added tokens (and --make-vocab-size-divisible-by padding): mean of the old rows.
        return resize_token_embeddings(_loaded(tensor), target.shape[0])
    return tensor


def _loaded(tensor: torch.Tensor | FileSpan) -> torch.Tensor:
    """A FileSpan (a source tensor not read yet) read, for the conversions that change it."""
    return tensor.tensor() if isinstance(tensor, FileSpan) else tensor


def _checked(name: str, tensor, targets: dict, path: str, original: str, llm):
    """The tensor as our parameter `name` needs it (vocab grown), or one clear error naming
    the tensor as the input names it (`original`)."""
    where = f"{path}: {original}" + (f" (read as {name})" if original != name else "")
    if name not in targets:
        raise ValueError(f"{where}: has no place in this model")
    target = targets[name]
    tensor = _fit_vocab(name, tensor, target, where, llm)
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"{where}: shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)} "
                         "(a checkpoint of another model size?)")
    return tensor


def _mapped(source, convert, path: str, targets: dict, llm):
    """(our name, checked tensor) for every tensor `convert` maps; errors name the input's key."""
    for name, tensor in source:
        try:
            pairs = convert(name, tensor)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {name}") from None
        for ours, part in pairs or ():
            yield ours, _checked(ours, part, targets, path, name, llm)


def _hf_llama_pair(name, tensor):
    ours = hf_to_llama(name)
    if ours is None:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        raise KeyError(name)
    return [(ours, tensor)]


def eva_vit_names(names: list[str]) -> dict[str, str | None]:
    """Each key of an EVA-CLIP file -> its name inside the ViT (None: not the ViT).

    Three layouts: the bare ViT (blocks.*); a CLIP model with the ViT under `visual.` and the
    text tower under `text.` (EVA-CLIP's CustomCLIP) or at top level (open_clip's CLIP:
    transformer.*, token_embedding, ln_final, ...); any of them `module.`-prefixed, as
    saved from DistributedDataParallel (EVA's own loader strips it too)."""
    ddp = bool(names) and all(n.startswith("module.") for n in names)
    inner = {n: n[len("module."):] if ddp else n for n in names}
    if not any(k.startswith("visual.") for k in inner.values()):
        return inner
    return {n: k[len("visual."):] if k.startswith("visual.") else None for n, k in inner.items()}


def _eva_source(path: str):
    source = open_source(path)
    keys = list(source.names) if isinstance(source, SafetensorsSource) else list(source.state)
    vit = eva_vit_names(keys)

    def pairs(name, tensor):
        return None if vit[name] is None else eva_to_ours(vit[name], tensor)

    return source, pairs


def source_tensors(kind: str, path: str, targets: dict, llm, lora_alpha: float = EMU_I_LORA_ALPHA):
    """(our name, tensor) pairs of one input, checked against `targets` (our parameters)."""
    if kind == "hf-llama":
        return _mapped(SafetensorsSource(path).spans(), _hf_llama_pair, path, targets, llm)  # renames: copied unread
    if kind == "eva-clip":
        return _mapped(*_eva_source(path), path, targets, llm)
    if kind == "emu-v1":
        return _mapped(merge_peft_lora(open_source(path), path, lora_alpha), emu_v1_to_ours, path, targets, llm)
    if kind == "hf-emu":
        return _mapped(hf_emu_tensors(path, spans=True), lambda n, t: [(n, t)], path, targets, llm)
    raise ValueError(f"unknown --from {kind!r}; choose from {KINDS}")


_FAMILIES = ("visual", "ln_visual", "causal_former", "llm", "regression_head")  # Emu's children


@torch.no_grad()
def fresh_parameters(model, names: list[str], seed: int):
    """Yield {name: tensor} per top-level module (family) holding some of `names`, each
    initialised alone, so only the families no input provides are ever allocated. The
    values are build_emu(config, seed)'s: initialisation is per parameter name (model/init.py)."""
    for family in _FAMILIES:
        wanted = [n for n in names if n.split(".", 1)[0] == family]
        if not wanted:
            continue
        module = getattr(model, family)
        module.to_empty(device="cpu")
        init_parameters(model, model.config.init_std, seed, names=set(wanted))
        params = dict(model.named_parameters())
        yield {n: params[n].detach() for n in wanted}
        module.to("meta")  # free it before the next family


def with_vocabulary_of_inputs(inputs: list[tuple[str, str]], config: ModelConfig) -> ModelConfig:
    """The config with Emu-I's six added tokens when an emu-v1 input is the released Emu-I
    (an embedding of base + 6 rows, [USER] and [ASSISTANT] included); else unchanged."""
    llm = config.llm
    for kind, path in inputs:
        if kind != "emu-v1":
            continue
        rows = embedding_rows(open_source(path).shapes())
        if rows == llm.base_vocab_size + NUM_INSTRUCT_SPECIAL_TOKENS and llm.num_special_tokens != NUM_INSTRUCT_SPECIAL_TOKENS:
            log.info("%s: embedding of %d rows = %d + [PAD] [IMG] [/IMG] <image> [USER] [ASSISTANT]: importing as Emu-I",
                     path, rows, llm.base_vocab_size)
            return dataclasses.replace(config, llm=dataclasses.replace(llm, num_special_tokens=NUM_INSTRUCT_SPECIAL_TOKENS))
    return config


def import_checkpoint(inputs: list[tuple[str, str]], config: ModelConfig, output: str, preset: str = "",
                      seed: int = 1234, dtype: torch.dtype | None = None, max_shard_bytes: int = 2**30,
                      lora_alpha: float = EMU_I_LORA_ALPHA) -> None:
    """Build our checkpoint from `inputs` [(kind, path)] as iteration 0 of `output`.

    Streaming: source tensors are checked, converted and collected into groups of about
    `max_shard_bytes`, each written (GroupedDCPWriter) and freed before the next is read;
    then the modules no input provides are initialised family by family. Peak memory:
    one group plus the largest fresh family, never the whole model.
    """
    config = with_vocabulary_of_inputs(inputs, source_config(inputs, config))  # validated up front
    targets = dict(build_emu(config, device="meta").named_parameters())  # shapes only
    sources = [(kind, path, source_tensors(kind, path, targets, config.llm, lora_alpha)) for kind, path in inputs]
    with atomic_output_dir(output) as tmp:
        directory = iteration_dir(tmp, 0)
        writer = GroupedDCPWriter(directory)
        group, used, filled = {}, 0, set()
        for kind, path, tensors in sources:
            mine = set()
            for name, tensor in tqdm(tensors, desc=f"read {os.path.basename(path.rstrip('/'))}", unit="tensor", leave=False):
                if name in filled:
                    raise ValueError(f"{path}: {name} was already given by an earlier input")
                if dtype is not None and tensor.dtype.is_floating_point and tensor.dtype != dtype:
                    tensor = _loaded(tensor).to(dtype)
                group[name], used = tensor, used + tensor.numel() * tensor.element_size()
                filled.add(name)
                mine.add(name)
                if used >= max_shard_bytes:
                    writer.write({"model": group})
                    group, used = {}, 0
            required = _REQUIRED.get(kind, ("",))
            missing = [n for n in targets if n.startswith(required) and n not in mine]
            if missing:
                raise ValueError(f"{path}: lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:3])}")
        if group:
            writer.write({"model": group})
        fresh = [n for n in targets if n not in filled]
        for family in fresh_parameters(build_emu(config, device="meta"), fresh, seed):
            writer.write({"model": {n: t.to(dtype) if dtype is not None else t for n, t in family.items()}})
        common = {"iteration": 0, "consumed_samples": 0, "scheduler": None, "layout": {}}
        writer.write({"common": pickle.dumps(common)})
        record = {"iteration": 0, "consumed_samples": 0, "layout": {"tp": 1, "pp": 1, "dp": 1},
                  "torch_version": torch.__version__, "imported_from": [list(i) for i in inputs],
                  "config": {"preset": preset, "model": dataclasses.asdict(config)}}
        with open(os.path.join(directory, RUN_CONFIG_NAME), "w") as f:
            json.dump(record, f, indent=2)
        writer.finish()  # .metadata, then checksums.json over every file
        write_latest(tmp, 0)
