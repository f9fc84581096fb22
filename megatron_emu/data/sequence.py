"""What a sequence is: SeqSpec (its length and the special tokens that lay it out) and
Sample (one built sequence with its images). The views of samples.py (pretraining) and
instruct.py (conversations) build Samples; collate turns them into batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    tokens: list[int]
    images: list[np.ndarray]  # uint8 (3, S, S) each, in order of appearance
    kind: str
    dropped_images: int = 0
    truncated_tokens: int = 0  # text tokens cut because the sequence was full
    answer_mask: list[int] | None = None  # conversations: 1 on answer tokens (data/instruct.py)


@dataclass
class SeqSpec:
    """What every view needs to lay out a sequence."""

    seq_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    img_start_id: int
    img_end_id: int
    image_id: int
    tokens_per_image: int = 34

    @classmethod
    def from_tokenizer(cls, tokenizer, seq_length: int, tokens_per_image: int = 34) -> "SeqSpec":
        s = tokenizer.special
        return cls(seq_length, tokenizer.bos_id, tokenizer.eos_id, s.pad, s.img_start, s.img_end, s.image,
                   tokens_per_image)

    def image_tokens(self) -> list[int]:
        return [self.img_start_id] + [self.image_id] * (self.tokens_per_image - 2) + [self.img_end_id]
