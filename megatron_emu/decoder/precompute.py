"""`--precompute-conditions` / `--precompute-latents`: one pass of the frozen models over
every pair of every dataset, rows shared out over the ranks (cache.py holds the format)."""

from __future__ import annotations

import os

import torch

from megatron_emu.decoder import cache
from megatron_emu.decoder.conditions import pair_conditions
from megatron_emu.decoder.data import emu_pixels, vae_pixels

PRECOMPUTE_BATCH = 8


def _read(source, indices):
    pairs = [source.read(i) for i in indices]
    images = torch.stack([torch.from_numpy(image.copy()) for _, image in pairs])  # uint8 (b, 3, S, S)
    return [c for c, _ in pairs], images


def condition_caches(frozen, data, config, rank: int, world: int, device) -> cache.KeyedCaches:
    hidden = frozen.emu.config.llm.hidden
    per_image = frozen.emu.config.causal_former.num_query_tokens
    readers = []
    for source in data.sources:
        meta = {"kind": "conditions", "dataset": os.path.abspath(source.prefix), "emu": config.emu_load,
                "preset": config.preset, "mode": config.condition_mode, "max_caption_tokens": config.max_caption_tokens}

        def compute(indices, source=source):
            captions, images = _read(source, indices)
            return pair_conditions(frozen.emu, captions, emu_pixels(images), frozen.bos_id, config.condition_mode)

        prefix = cache.cache_prefix(config.cache_dir, source.prefix, "conditions")
        cache.build_cache(prefix, meta, len(source), (per_image, hidden), "bfloat16", compute, PRECOMPUTE_BATCH, rank, world)
        readers.append(cache.CacheReader(prefix, meta))
    return cache.KeyedCaches(readers)


def latent_caches(frozen, data, config, rank: int, world: int, device) -> cache.KeyedCaches:
    """Caches the VAE posterior's moments (mean, logvar), so every epoch still samples fresh latents."""
    vae = frozen.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (2 * vae.config.latent_channels, config.resolution // factor, config.resolution // factor)
    readers = []
    for source in data.sources:
        meta = {"kind": "latents", "dataset": os.path.abspath(source.prefix), "vae": config.pretrained_sd or "tiny",
                "resolution": config.resolution}

        @torch.no_grad()
        def compute(indices, source=source):
            _, images = _read(source, indices)
            pixels = vae_pixels(images, config.resolution).to(device, vae.dtype)
            return vae.encode(pixels).latent_dist.parameters  # (b, 2C, h, w)

        prefix = cache.cache_prefix(config.cache_dir, source.prefix, "latents")
        cache.build_cache(prefix, meta, len(source), shape, "float16", compute, PRECOMPUTE_BATCH, rank, world)
        readers.append(cache.CacheReader(prefix, meta))
    return cache.KeyedCaches(readers)
