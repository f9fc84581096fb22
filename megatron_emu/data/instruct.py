"""Conversations for Emu-I instruction tuning: template -> stored items -> samples with an
answer mask (paper section 4, Appendix B.2).

Stored (preprocess): one document per conversation, its items in template order,
    <System Message>                      MODE_TEXT, with the visual content (MODE_IMAGE
                                          items) where Table 6 writes [IMG]ImageContent[/IMG]
    [USER]: <Instruction> [ASSISTANT]:    MODE_TEXT
    <Answer></s>                          MODE_ANSWER
    ... one (instruction, answer) pair per turn
so the role of every span survives in megatron-core's own per-sequence modes.
Loaded (ConversationView): the sample's `answer_mask` is 1 on every MODE_ANSWER token
(each turn's answer and its </s>) and 0 elsewhere; the loss trains only those targets
(model/loss.py). Images in the system message are inputs, never regression targets:
no l2 term unless an answer holds an image (none of the public formats has one).
"""

from __future__ import annotations

import numpy as np

from megatron_emu.data.indexed import MODE_ANSWER, MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.prompts import system_message_parts
from megatron_emu.data.sequence import Sample, SeqSpec

SYSTEM_KINDS = ("language", "image", "video")


def question_ids(tokenizer, question: str) -> list[int]:
    """One turn's prompt, [USER]: q [ASSISTANT]: ; its answer follows. Generation ends a chat
    prompt with it (generation/prompts.py chat_prompt), so both read the same tokens."""
    special = tokenizer.special
    return [special.user] + tokenizer.encode(": " + question) + [special.assistant] + tokenizer.encode(":")


def encode_turns(tokenizer, turns: list[tuple[str, str]]) -> list[tuple[int, np.ndarray]]:
    """(instruction, answer) pairs -> [USER]: q [ASSISTANT]: (TEXT), answer </s> (ANSWER)."""
    items = []
    for question, answer in turns:
        items.append((MODE_TEXT, np.asarray(question_ids(tokenizer, question), dtype=np.int64)))
        items.append((MODE_ANSWER, np.asarray(tokenizer.encode(answer, eos=True), dtype=np.int64)))
    return items


def render_conversation(tokenizer, system: str, visuals: list, turns: list[tuple[str, str]]):
    """The whole Emu-I template as stored items (see the module docstring); visuals: the
    images as DocumentWriter stores them (uint8 arrays, or JPEG bytes). Generation passes
    its images here as they are: MODE_IMAGE items are placed, never read."""
    if system not in SYSTEM_KINDS:
        raise ValueError(f"system message kind {system!r}: choose one of {SYSTEM_KINDS}")
    if tokenizer.num_special_tokens < 6:
        raise ValueError(f"{tokenizer.model_path}: conversations need [USER] / [ASSISTANT] (--num-special-tokens 6)")
    items = []
    before, after = system_message_parts(system)
    if before.strip():
        items.append((MODE_TEXT, np.asarray(tokenizer.encode(before.strip()), dtype=np.int64)))
    items += [(MODE_IMAGE, v) for v in visuals]
    if after.strip():
        items.append((MODE_TEXT, np.asarray(tokenizer.encode(after.strip()), dtype=np.int64)))
    return items + encode_turns(tokenizer, turns)


class ConversationView:
    """One sample per conversation: BOS + the stored items; what does not fit in
    seq_length is cut (text) or dropped (images) and counted, as in pretraining."""

    kind = "conversation"

    def __init__(self, data: MultimodalIndexed, spec: SeqSpec):
        self.data, self.spec = data, spec

    def __len__(self) -> int:
        return len(self.data)

    def build(self, index: int, key: tuple) -> Sample:
        tokens, mask, images, dropped, truncated = [self.spec.bos_id], [0], [], 0, 0
        for mode, value in self.data.read_document(index):
            room = self.spec.seq_length - len(tokens)
            if mode == MODE_IMAGE:
                if self.spec.tokens_per_image <= room:
                    tokens += self.spec.image_tokens()
                    mask += [0] * self.spec.tokens_per_image
                    images.append(value)
                else:
                    dropped += 1
                continue
            kept = value[: max(room, 0)].tolist()
            tokens += kept
            mask += [int(mode == MODE_ANSWER)] * len(kept)
            truncated += len(value) - len(kept)
        return Sample(tokens, images, self.kind, dropped, truncated, answer_mask=mask)


def answer_mask_rows(rows: list[list[int]], seq_length: int):
    """Per-row answer masks (each as long as its row's tokens) -> (B, seq_length) float, 0-padded."""
    import torch

    out = torch.zeros((len(rows), seq_length))
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out
