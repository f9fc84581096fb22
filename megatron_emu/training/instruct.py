"""What instruction tuning (--lora-rank > 0, paper section 4) adds to the pretraining run.

The loop is pretraining's (training/train.py); this file holds the differences:
the LoRA spec handed to the model builders, the [USER] / [ASSISTANT] embedding rows,
initialised from the embeddings of the words "user" and "assistant" (paper), and
--lora-merge (base + adapters -> one full checkpoint). A base that has these rows (an
Emu-I) keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.config import LoRAConfig, TrainConfig
from megatron_emu.model.lora import LoRASpec, merge_lora
from megatron_emu.training.checksum_writer import ChecksummingWriter
from megatron_emu.training.checkpoint import Checkpointer, model_state
from megatron_emu.training.checkpoint_files import RUN_CONFIG_NAME, iteration_dir, write_latest
from megatron_emu.training.pretrained import load_pretrained, vocabulary_rows

log = logging.getLogger("megatron_emu")

CHAT_WORDS = ("user", "assistant")  # -> [USER], [ASSISTANT]
VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")


def lora_spec(config: TrainConfig) -> LoRASpec | None:
    lora = config.lora
    return LoRASpec(lora.rank, lora.alpha, lora.dropout) if lora.enabled else None


def check_instruct_run(config: TrainConfig) -> None:
    if config.lora.enabled and not config.lora.merge and not config.data.data_path:
        raise ValueError("--lora-rank: instruction tuning needs --data-path of conversations "
                         "(tools/preprocess_data.py --input-type sharegpt|alpaca|llava|videochat)")


def merge_checkpoint(config: TrainConfig, pmodel, optimizer, tokenizer) -> str:
    """--lora-merge: the base (--pretrained-checkpoint) + the adapters (--load; none: B = 0,
    i.e. the base with its [USER] / [ASSISTANT] rows) -> a full checkpoint in --save."""
    base = None
    checkpointer = Checkpointer(config.checkpoint, config)
    if config.checkpoint.pretrained_checkpoint:
        base = load_pretrained(config.checkpoint.pretrained_checkpoint, pmodel.parts, dataclasses.asdict(config.model),
                               checkpointer.process_group)
    resumed = checkpointer.load(pmodel.parts, optimizer)
    init_new_chat_token_rows(pmodel.parts, tokenizer, config.checkpoint.pretrained_checkpoint)
    return save_merged(pmodel, config, resumed.iteration, base)


def init_new_chat_token_rows(parts, tokenizer, pretrained: str) -> None:
    """The [USER] / [ASSISTANT] rows from the words, unless the base (--pretrained-checkpoint)
    already has them: an Emu-I (imported, or merged) keeps its trained rows."""
    if pretrained and vocabulary_rows(pretrained) >= tokenizer.vocab_size:
        log.info("base %s has the [USER] / [ASSISTANT] rows already: kept", pretrained)
        return
    init_chat_token_rows(parts, tokenizer)


def word_pieces(tokenizer, word: str) -> list[int]:
    pieces = tokenizer.sp.encode(word)
    if not pieces:
        raise ValueError(f"{tokenizer.model_path}: the word {word!r} encodes to no pieces")
    return pieces


@torch.no_grad()
def init_chat_token_rows(parts, tokenizer) -> None:
    """Rows [USER] and [ASSISTANT] of the embedding and the LM head := the mean of the rows
    of the sentencepiece pieces of "user" and "assistant" (one piece for LLaMA's vocabulary).
    Works on sharded (DTensor) weights: each rank rebuilds the whole matrix and keeps its shard."""
    special = tokenizer.special
    targets = {special.user: word_pieces(tokenizer, CHAT_WORDS[0]), special.assistant: word_pieces(tokenizer, CHAT_WORDS[1])}
    for part in parts:
        params = dict(part.named_parameters())
        for suffix in VOCAB_ROWS:
            name = next((n for n in params if n.replace("_orig_mod.", "").endswith(suffix)), None)
            if name is None:
                continue  # this pipeline stage has no embedding / head
            param = params[name]
            whole = param.full_tensor() if isinstance(param, DTensor) else param.data  # (V, H)
            for row, pieces in targets.items():
                whole[row] = whole[pieces].float().mean(dim=0).to(whole.dtype)
            if isinstance(param, DTensor):
                param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                                         src_data_rank=None).to_local())
    log.info("[USER] / [ASSISTANT] rows initialised from the pieces of %s", CHAT_WORDS)


def save_merged(pmodel, config: TrainConfig, iteration: int, base: dict | None) -> str:
    """--lora-merge: W += (alpha / r) B A in every adapted projection, then save the whole model
    (no adapters, no optimizer) as a full checkpoint in --save: a base for --pretrained-checkpoint,
    tools/convert_checkpoint.py or generation. One process (the merge is plain tensor math)."""
    if pmodel.pmesh.dims.world_size > 1:
        raise ValueError("--lora-merge runs on one process (plain tensors); launch it without torchrun")
    if not config.checkpoint.save:
        raise ValueError("--lora-merge needs --save (where the merged checkpoint goes)")
    merged = merge_lora(pmodel.parts[0])
    directory = save_full_checkpoint(pmodel.parts[0], config, iteration,
                                     {"adapters": config.checkpoint.load, "pretrained_checkpoint": base})
    log.info("merged %d LoRA adapters into the base; full checkpoint %s", merged, directory)
    return directory


def save_full_checkpoint(model, config: TrainConfig, iteration: int, merged_from: dict | None = None) -> str:
    """A single-process model (no adapters) as a model-only checkpoint in config.checkpoint.save,
    readable by --pretrained-checkpoint and tools/convert_checkpoint.py (--to hf)."""
    directory = iteration_dir(config.checkpoint.save, iteration)
    # Written like every save (training/checkpoint.py): into a .tmp directory with checksums.json
    # (run_config.json included), renamed into place, and only then made `latest`.
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    plain = dataclasses.replace(config, lora=LoRAConfig())
    with open(os.path.join(tmp, RUN_CONFIG_NAME), "w") as f:
        json.dump({"iteration": iteration, "consumed_samples": 0, "layout": {"tp": 1, "pp": 1, "dp": 1},
                   "torch_version": torch.__version__, "config": dataclasses.asdict(plain),
                   "merged_from": merged_from}, f, indent=2)
    common = {"iteration": iteration, "consumed_samples": 0, "scheduler": None, "layout": None}
    dcp.save({"model": model_state([model]), "common": pickle.dumps(common)}, storage_writer=ChecksummingWriter(tmp))
    shutil.rmtree(directory, ignore_errors=True)  # an earlier merge into the same --save
    os.rename(tmp, directory)
    write_latest(config.checkpoint.save, iteration)
    return directory
