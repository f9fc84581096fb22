"""Random but well-formed micro-batches, shaped as the loader yields them.

For benchmarks and tests that need the model's input format without a dataset.
"""

import torch

from megatron_emu.config import ModelConfig


def random_batch(config: ModelConfig, batch_size: int = 2, seq_length: int = 96, images_per_sample: int = 1,
                 seed: int = 0) -> dict:
    """{"tokens": (B, S), "images": (B * k, 3, H, W) uint8}: BOS and text, k images as
    `[IMG] <image> x 32 [/IMG]` blocks between text, [PAD] at the end."""
    g = torch.Generator().manual_seed(seed)
    special = config.special_tokens
    block = [special.img_start] + [special.image] * config.causal_former.num_query_tokens + [special.img_end]
    text = lambda n: torch.randint(3, special.pad, (max(n, 0),), generator=g).tolist()  # noqa: E731
    rows = []
    for _ in range(batch_size):
        row = [1] + text(5)
        for _ in range(images_per_sample):
            row += block + text(4)
        if len(row) > seq_length:
            raise ValueError(f"seq_length {seq_length} cannot hold {images_per_sample} images per sample")
        row += text(seq_length - len(row) - 4) + [special.pad] * 4
        rows.append(row[:seq_length])
    size = config.vision.image_size
    images = torch.randint(0, 256, (batch_size * images_per_sample, 3, size, size), generator=g, dtype=torch.uint8)
    return {"tokens": torch.tensor(rows), "images": images}
