"""Shared tiny fixtures for the decoder tests: pair datasets, an Emu state file, an SD directory."""

import numpy as np
import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, DocumentWriter
from megatron_emu.decoder.unet import build_tiny_sd, save_sd_components
from megatron_emu.model.emu import build_emu

SD_TEXT_DIM = 32  # the "pretrained" SD's cross-attention width; Emu tiny's hidden is 128


def write_pairs(prefix: str, num: int, seed: int, vocab_size: int) -> str:
    rng = np.random.default_rng(seed)
    writer = DocumentWriter(prefix, vocab_size)
    for _ in range(num):
        caption = rng.integers(3, 500, size=int(rng.integers(3, 9)))
        # Smooth images (a colour gradient), so the VAE sees something image-like.
        base = rng.integers(0, 256, size=(3, 1, 1))
        ramp = np.linspace(0, 1, 224)[None, :, None] * rng.integers(0, 128, size=(3, 1, 1))
        image = np.clip(base + ramp + np.zeros((3, 224, 224)), 0, 255).astype(np.uint8)
        items = [(MODE_TEXT, caption), (MODE_IMAGE, image)]
        writer.add_document(items if rng.integers(2) else items[::-1])
    writer.finalize({"kind": "pairs", "image_size": 224, "vocab_size": vocab_size, "tokenizer": "test"})
    return prefix


@pytest.fixture(scope="session")
def decoder_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_assets")
    config = get_preset("tiny")
    vocab = config.llm.vocab_size
    emu_path = str(root / "emu.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in build_emu(config, seed=3).state_dict().items()}, emu_path)
    sd_dir = str(root / "sd")
    save_sd_components(build_tiny_sd(SD_TEXT_DIM, seed=1), sd_dir)
    return {
        "root": root,
        "emu": emu_path,
        "sd": sd_dir,
        "coco": write_pairs(str(root / "coco"), 10, 0, vocab),
        "aesthetics": write_pairs(str(root / "aesthetics"), 6, 1, vocab),
    }
