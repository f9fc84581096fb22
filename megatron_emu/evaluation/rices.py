"""RICES (Yang et al., as Flamingo and the paper, Appendix C.3): in-context examples are the
training samples whose image (or video: mean of its frames) is most similar to the query's.

Features are our own EVA-CLIP's: the class token of the vision tower's last block after
Emu's visual LayerNorm, L2-normalised, so the dot product is the cosine similarity. The
pool is up to 5000 training samples drawn with a fixed seed (the paper's 5000); its
features are computed once, split over the data-parallel ranks, and cached to disk keyed
by the checkpoint and the pool's files: later runs (and the other settings) read them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import torch

from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.tasks import TaskSpec
from megatron_emu.generation.prompts import Video, read_image

POOL_SIZE = 5000


@torch.no_grad()
def visual_features(emu, sample: Sample, spec: TaskSpec) -> torch.Tensor:
    """(D,) unit-norm feature of the sample's image, or the mean over its video's frames."""
    frames = Video.from_path(sample.visual).frames if spec.video else [sample.visual]
    device = emu.visual.patch_embed.proj.weight.device
    images = torch.stack([read_image(f, emu.config.vision.image_size) for f in frames]).to(device)  # (F, 3, S, S)
    from megatron_emu.model.vision import normalize_images

    pixels = normalize_images(images, emu.visual.patch_embed.proj.weight.dtype)
    tokens = emu.ln_visual(emu.visual(pixels))  # (F, 257, C)
    if hasattr(tokens, "full_tensor"):
        tokens = tokens.full_tensor()
    feature = tokens[:, 0].float().mean(dim=0)  # (C,) class token, mean over frames
    return torch.nn.functional.normalize(feature, dim=0).cpu()


def stage_features(emu, sample: Sample, spec: TaskSpec, forward=None) -> torch.Tensor:
    """visual_features on every rank; under pipeline parallelism the first stage (the one
    holding the vision tower) computes them for the others (forward: generation/forward.py)."""
    if forward is None:
        return visual_features(emu, sample, spec)
    return forward.on_first_stage(lambda: visual_features(emu, sample, spec), (emu.config.vision.width,))


def draw_pool(train: list[Sample], seed: int = 0, size: int = POOL_SIZE) -> list[Sample]:
    if len(train) <= size:
        return list(train)
    return [train[i] for i in sorted(random.Random(seed).sample(range(len(train)), size))]


class Rices:
    def __init__(self, pool: list[Sample], features: torch.Tensor):
        self.pool, self.features = pool, features  # (P, D) unit rows

    @classmethod
    def build(cls, emu, spec: TaskSpec, pool: list[Sample], cache_dir: str, checkpoint_id: str, dp,
              forward=None) -> "Rices":
        """Pool features from the cache, or computed over the DP ranks and cached (rank 0 writes).
        forward: the generator's (its pipeline stages share the first stage's features)."""
        key = json.dumps([checkpoint_id, spec.name, [(s.key, s.visual) for s in pool]])
        path = os.path.join(cache_dir, f"rices-{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
        if os.path.exists(path):
            return cls(pool, torch.load(path, weights_only=True))
        mine = {i: stage_features(emu, pool[i], spec, forward).tolist() for i in dp.shard_indices(len(pool))}
        everything = dp.gather(mine)
        features = torch.tensor([everything[i] for i in range(len(pool))])  # (P, D)
        if dp.first:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(features, path + ".tmp")
            os.replace(path + ".tmp", path)  # a killed run leaves no half-written cache
        return cls(pool, features)

    def nearest(self, query: torch.Tensor, k: int, exclude: str = "") -> list[Sample]:
        """The k pool samples most similar to `query` (D,), most similar first; `exclude`:
        a key never returned (the query itself when the pool is its own split)."""
        similarity = self.features @ query  # (P,)
        order = torch.argsort(similarity, descending=True, stable=True).tolist()
        return [self.pool[i] for i in order if self.pool[i].key != exclude][:k]
