"""Random but well-formed model inputs for tests that do not need the real loader."""

import torch

from megatron_emu.config import ModelConfig


def random_batch(config: ModelConfig, batch_size: int = 2, seq_length: int = 96, images_per_sample: int = 1, seed: int = 0) -> dict:
    """{"tokens": (B, S), "images": (B * images_per_sample, 3, H, W) uint8}: text, then the
    images as `[IMG] <image> x 32 [/IMG]` blocks, more text, and [PAD] at the end."""
    g = torch.Generator().manual_seed(seed)
    special = config.special_tokens
    per_image = config.causal_former.num_query_tokens
    image_block = [special.img_start] + [special.image] * per_image + [special.img_end]
    rows = []
    for _ in range(batch_size):
        row = [1] + torch.randint(3, special.pad, (5,), generator=g).tolist()
        for _ in range(images_per_sample):
            row += image_block + torch.randint(3, special.pad, (4,), generator=g).tolist()
        if len(row) > seq_length:
            raise ValueError(f"seq_length {seq_length} too short for {images_per_sample} images")
        row += [special.pad] * 4
        row += torch.randint(3, special.pad, (max(seq_length - len(row), 0),), generator=g).tolist()
        rows.append(row[:seq_length])
    size = config.vision.image_size
    images = torch.randint(0, 256, (batch_size * images_per_sample, 3, size, size), generator=g, dtype=torch.uint8)
    return {"tokens": torch.tensor(rows), "images": images}
