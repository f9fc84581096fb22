"""Random variable-length samples and their packed / unpacked micro-batches, for tests."""

import numpy as np
import torch

from megatron_emu.config import ModelConfig
from megatron_emu.data.packing import collate_packed
from megatron_emu.data.samples import Sample, SeqSpec, collate

BOS, EOS = 1, 2


def seq_spec(config: ModelConfig, seq_length: int) -> SeqSpec:
    s = config.special_tokens
    return SeqSpec(seq_length, BOS, EOS, s.pad, s.img_start, s.img_end, s.image, config.tokens_per_image)


def random_samples(config: ModelConfig, shapes: list[tuple[int, int]], seed: int = 0) -> list[Sample]:
    """shapes: (text tokens, images) per sample -> BOS, text and image blocks interleaved, EOS."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    special, size = config.special_tokens, config.vision.image_size
    block = [special.img_start] + [special.image] * config.causal_former.num_query_tokens + [special.img_end]
    samples = []
    for text, images in shapes:
        pieces = torch.randint(3, special.pad, (text,), generator=g).tolist()
        cut = np.sort(rng.integers(0, text + 1, images)).tolist()  # where each image goes
        tokens, start = [BOS], 0
        for c in cut:
            tokens += pieces[start:c] + block
            start = c
        tokens += pieces[start:] + [EOS]
        pixels = [rng.integers(0, 256, (3, size, size), dtype=np.uint8) for _ in range(images)]
        samples.append(Sample(tokens, pixels, "test"))
    return samples


def micro_batches(config: ModelConfig, seq_length: int, shapes: list[tuple[int, int]], seed: int = 0):
    """(unpacked, packed) collation of the same samples."""
    samples = random_samples(config, shapes, seed)
    spec = seq_spec(config, seq_length)
    return collate(samples, spec, config.vision.image_size), collate_packed(samples, spec, config.vision.image_size)
