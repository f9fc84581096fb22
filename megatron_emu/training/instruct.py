"""What instruction tuning (--lora-rank > 0, paper section 4) adds to the pretraining run.

The loop is pretraining's (training/train.py); this file holds the differences:
the LoRA spec handed to the model builders, and the [USER] / [ASSISTANT] embedding
rows, initialised from the embeddings of the words "user" and "assistant" (paper).
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_emu.config import TrainConfig
from megatron_emu.model.lora import LoRASpec

log = logging.getLogger("megatron_emu")

CHAT_WORDS = ("user", "assistant")  # -> [USER], [ASSISTANT]
VOCAB_ROWS = ("llm.tok_embeddings.weight", "llm.output.weight")


def lora_spec(config: TrainConfig) -> LoRASpec | None:
    lora = config.lora
    return LoRASpec(lora.rank, lora.alpha, lora.dropout) if lora.enabled else None


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
