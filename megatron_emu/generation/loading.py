"""An Emu, or one rank's part of it, for inference from any of the forms we write
(weight_sources.py says where their tensors lie), with the model size it was saved with.

read_part builds the part on the meta device (pipeline stage, then TP shards), allocates it
in the compute dtype and reads only its tensors, a batch at a time. An instruction-tuning
checkpoint (adapters only, pretrain_emu.py --lora-rank) is built on its base as training
builds it (the base grown by [USER] / [ASSISTANT], their rows set from the words) and
merged as --lora-merge merges, so it decodes the tokens of the merged checkpoint. The base
is the one the checkpoint records, or `base` (--pretrained-checkpoint); one whose
fingerprint differs from the record is refused.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.config import LLAMA_FUNCTION_FIELDS, ModelConfig
from megatron_emu.generation.weight_sources import SpanSource, is_adapters, partial_source, state_file_source
from megatron_emu.model.emu import Emu, build_emu


def load_for_inference(path: str, preset: str = "tiny", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, base: str = "", tokenizer_model: str = "") -> Emu:
    """Frozen Emu (eval, no grads) with the weights at `path` (and, for adapters, `base`).
    tokenizer_model: the tokenizer of an adapter run (the words "user" / "assistant")."""
    from megatron_emu.generation.frozen import freeze

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint, export or state-dict file")
    source, config = partial_source(path, preset)
    if base and not is_adapters(source):
        if isinstance(source, SpanSource):  # an HF export or a state file
            raise ValueError(f"--pretrained-checkpoint {base}: only an adapter checkpoint --load has a base, not {path}")
        raise ValueError(f"--pretrained-checkpoint {base}: {source.path} is a full checkpoint, not adapters")
    if is_adapters(source):
        model = adapted_on_base(source, config, base, tokenizer_model)
    else:
        model = read_part(source, config, lambda emu: emu)
    return freeze(model.to(device, dtype))


def read_part(source, config: ModelConfig, keep, shard=None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Emu:
    """The frozen part `keep(emu)` of the source's Emu (on `device`, in `dtype`), reading its
    tensors only: a pipeline stage of a 14B model without the whole model in memory. With
    `shard` (tensor parallelism, applied on the meta device first) each rank allocates only
    its shards and keeps its slice of each tensor read."""
    from megatron_emu.generation.frozen import freeze

    whole = build_emu(config, device="meta")
    check_names(source, set(whole.state_dict()))
    model = keep(whole)
    if shard is not None:
        shard(model)
    model.to(dtype).to_empty(device=device)  # allocated in the compute dtype: no fp32 copy first
    model.llm.init_rope()  # the one buffer (not saved), computed in fp32 ...
    model.llm.rope = model.llm.rope.to(dtype)  # ... and held in the model's dtype, as Module.to(dtype) leaves it
    expected = model.state_dict()  # the part's own tensors (DTensors where sharded): copying into them loads it
    wrong = [f"{n} {source.shape(n)} (expected {tuple(t.shape)})" for n, t in expected.items() if source.shape(n) != t.shape]
    if wrong:
        raise ValueError(f"{source.path}: not an Emu of this config: {', '.join(wrong[:3])}")
    for names in batches(sorted(expected), lambda n: expected[n].numel() * expected[n].element_size(), READ_BATCH_BYTES):
        for name, tensor in source.read(names).items():
            copy_into(expected[name], tensor)
    return freeze(model)


def copy_into(target: torch.Tensor, whole: torch.Tensor, add: bool = False) -> None:
    """target := whole (add: target += whole); a sharded (DTensor) target takes only its own
    slice of `whole`, cut locally."""
    if isinstance(target, DTensor):
        whole = distribute_tensor(whole.to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target = target.to_local()
    if add:
        target.add_(whole.to(target.dtype))
    else:
        target.copy_(whole)


READ_BATCH_BYTES = 512 * 2**20  # read this much at a time: the part plus one batch in memory


def batches(names: list[str], nbytes, limit: int) -> list[list[str]]:
    """`names` in order, cut into runs of at most `limit` bytes (a larger tensor alone)."""
    out, size = [], limit
    for name in names:
        if size + nbytes(name) > limit:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes(name)
    return out


def check_names(source, names: set[str]) -> None:
    """Every tensor of the whole Emu is there, and (a state file, an export) nothing else."""
    missing = sorted(names - set(source.entries))
    unexpected = sorted(set(source.entries) - names) if isinstance(source, SpanSource) else []
    if missing or unexpected:
        raise ValueError(f"{source.path}: not an Emu of this config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def adapted_on_base(source, config: ModelConfig, base: str, tokenizer_model: str, keep=lambda emu: emu,
                    shard=None, device: torch.device | str = "cpu") -> Emu:
    """The part `keep(emu)` of an adapter checkpoint (DCPSource) on its base, merged: the steps
    of --lora-merge (training/instruct.py merge_checkpoint) in memory, on the part only: the
    base's tensors of the part are read as training's pipeline stages read them (with `shard`,
    each rank its own shards), and each adapter pair is merged into its weight as
    W += (alpha / r) B A, a sharded W taking its slice of the product (float32, on `device`)."""
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
    from megatron_emu.model.lora import LoRASpec, apply_lora
    from megatron_emu.training.instruct import init_new_chat_token_rows
    from megatron_emu.training.pretrained import base_identity, check_same_base, load_pretrained

    recorded = source.record.get("pretrained_checkpoint")
    if not base:
        if recorded is None:
            raise ValueError(f"{source.path}: adapters that record no base checkpoint: give --pretrained-checkpoint")
        base = recorded["directory"]
        if not os.path.isdir(base):
            raise ValueError(f"{source.path}: its base {base} is gone: give --pretrained-checkpoint (the same base)")
    check_same_base(source.path, recorded, base_identity(base))
    lora = source.record["config"]["lora"]
    spec = LoRASpec(lora["rank"], lora["alpha"])
    every = set(apply_lora(build_emu(config, device="meta"), spec))
    if set(source.entries) != every:
        raise ValueError(f"{source.path}: holds {len(source.entries)} tensors, not the {len(every)} adapters "
                         f"of rank {lora['rank']} its run config describes")
    model = keep(build_emu(config, device="meta"))
    weights = set(model.state_dict())
    mine = sorted(n for n in every if n.rsplit(".lora.", 1)[0] + ".weight" in weights)  # this part's adapters
    if shard is not None:
        shard(model)
    model.to_empty(device=device)  # every tensor is read below: the base's, then the merged adapters
    model.llm.init_rope()  # the one buffer (not saved)
    load_pretrained(base, [model], dataclasses.asdict(config))
    tokenizer = EmuTokenizer(tokenizer_model or build_tiny_tokenizer(), config.llm.num_special_tokens)
    init_new_chat_token_rows([model], tokenizer, base)
    merge_adapters(model, source.read(mine), spec.alpha / spec.rank)  # checksums verified on read
    return model


def merge_adapters(model: Emu, adapters: dict[str, torch.Tensor], scaling: float) -> None:
    """W += scaling * B A for every `<linear>.lora.lora_A` / `lora_B` pair: model/lora.py
    merge_lora's arithmetic, on weights that may be sharded."""
    weights = dict(model.named_parameters())
    for name in sorted(n for n in adapters if n.endswith(".lora.lora_A")):
        stem = name.removesuffix(".lora.lora_A")
        delta = (adapters[stem + ".lora.lora_B"].float() @ adapters[name].float()) * scaling  # (out, in)
        with torch.no_grad():
            copy_into(weights[stem + ".weight"], delta, add=True)


def load_emu(config: ModelConfig, path: str, device: torch.device | str = "cpu") -> Emu:
    """The decoder's `--emu-load`: a frozen Emu of `config` with the weights at `path` (our
    checkpoint, any layout, or a state-dict file; empty path: random, for smoke runs),
    read tensor by tensor into a model built without initialising it (generation/loading.py
    read_part): at 14B no random init and no second copy of the weights. One of our
    checkpoints also sets what its LLaMA computes (norm eps, rope: e.g. an imported LLaMA-2's
    1e-5), whatever the preset says."""
    from megatron_emu.generation.frozen import freeze

    if not path:
        return freeze(build_emu(config, device="cpu", seed=0).to(device))
    if os.path.isdir(path):
        from megatron_emu.convert.streams import DCPSource
        from megatron_emu.training.checkpoint_files import recorded_model_config

        saved = recorded_model_config(path).llm
        config = dataclasses.replace(config, llm=dataclasses.replace(
            config.llm, **{f: getattr(saved, f) for f in LLAMA_FUNCTION_FIELDS}))
        source = DCPSource(path)
    elif os.path.isfile(path):
        source = state_file_source(path)
    else:
        raise ValueError(f"{path}: --emu-load does not exist")
    head = "regression_head.weight"  # (hidden, hidden): the one shape that says the model's width
    hidden = config.llm.hidden
    if head in source.entries and source.shape(head) != (hidden, hidden):
        raise ValueError(f"{path}: Emu hidden size {source.shape(head)[0]} but the preset's is {hidden}")
    return read_part(source, config, lambda emu: emu, device=device)  # frozen, allocated on `device`
