"""Decoder training data: image-caption pair datasets (our indexed format) mixed by weight.

Paper (section 3.3): LAION-COCO : LAION-Aesthetics = 7 : 2, i.e.
`--data-path 7 laion_coco_prefix 2 laion_aesthetics_prefix`. Datasets are written by
tools/preprocess_data.py in the pretraining format (kind "pairs": one caption and one
image per document). The mixture reuses the pretraining blend (data/blend.py): every
global batch holds exactly round(7/9 B) and round(2/9 B) samples, drawn by a seeded
per-epoch permutation, so a sample is identified by (dataset, document) and a resume
at step s reads exactly what an uninterrupted run would.

Images: the pretraining format stores 224x224 (what EVA-CLIP reads). Emu gets those
bytes unchanged; the VAE gets them bicubically resized (antialiased) to `--resolution`
(512 for SD v1.5), scaled to [-1, 1]. Upsampling 224 -> 512 cannot add detail: for a
sharp decoder write the pair datasets at 512 (`--image-size 512` in preprocessing) --
images above 224 are downsampled for Emu and used as is (or downsampled) for the VAE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from megatron_emu.data.blend import BatchPlan, parse_data_path, sample_index
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, MultimodalIndexed

EMU_IMAGE_SIZE = 224


def bundled_pairs(cache_dir: str = "") -> list[str]:
    """--data-path of the tiny default: the synthetic corpus's image-caption pairs (the
    corpus pretraining's command 1 builds; built once and cached, safe on every rank)."""
    from megatron_emu.data.loader import ensure_synthetic_corpus
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    data_path = ensure_synthetic_corpus(cache_dir, EmuTokenizer(build_tiny_tokenizer(cache_dir)))
    pairs = [prefix for prefix in data_path[1::2] if prefix.endswith("pairs")]
    return ["1", pairs[0]]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float (N, 3, size, size) in [0, 255], bicubic + antialias."""
    x = images.float()
    if images.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)


def vae_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> (N, 3, R, R) in [-1, 1], SD's VAE input range."""
    return resize_uint8(images, resolution) / 127.5 - 1.0


def emu_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, 224, 224), the input Emu's vision tower expects."""
    if images.shape[-1] == EMU_IMAGE_SIZE:
        return images
    return resize_uint8(images, EMU_IMAGE_SIZE).round().to(torch.uint8)


class PairSource:
    """One indexed dataset of kind "pairs": document i -> (caption ids, uint8 image)."""

    def __init__(self, prefix: str, max_caption_tokens: int):
        self.prefix = prefix
        self.data = MultimodalIndexed(prefix)
        if self.data.kind != "pairs":
            raise ValueError(f"{prefix}.json: the decoder trains on image-caption pairs, this dataset is {self.data.kind!r}")
        self.max_caption_tokens = max_caption_tokens

    def __len__(self) -> int:
        return len(self.data)

    def read(self, index: int) -> tuple[list[int], np.ndarray]:
        items = self.data.read_document(index)
        texts = [v for m, v in items if m == MODE_TEXT]
        images = [v for m, v in items if m == MODE_IMAGE]
        if len(images) != 1:
            raise ValueError(f"{self.prefix}: document {index} holds {len(images)} images, a pair holds one")
        caption = np.concatenate(texts).tolist() if texts else []
        # The paper drops captions longer than 150; truncating keeps the blend's indices stable.
        return caption[: self.max_caption_tokens], images[0]


class DecoderMicroBatches(Dataset):
    """Index k = step * accumulation + micro -> this rank's micro-batch of that step.

    Global batch = micro_batch_size x accumulation x world_size; rank r owns the slots
    [r * per_rank, (r + 1) * per_rank) of the step's shuffled global batch.
    """

    def __init__(self, data_path: list[str], micro_batch_size: int, accumulation: int, rank: int, world: int,
                 seed: int, max_caption_tokens: int, read_images: bool = True):
        pairs = parse_data_path(data_path)
        self.prefixes = [p for _, p in pairs]
        self.sources = [PairSource(p, max_caption_tokens) for p in self.prefixes]
        self.micro_batch_size, self.accumulation, self.rank = micro_batch_size, accumulation, rank
        self.plan = BatchPlan([w for w, _ in pairs], micro_batch_size * accumulation * world, seed)
        self.seed, self.read_images = seed, read_images

    def keys(self, k: int) -> list[tuple[int, int]]:
        """(dataset id, document index) of every sample of micro-batch k."""
        step, micro = divmod(k, self.accumulation)
        start = (self.rank * self.accumulation + micro) * self.micro_batch_size
        slots = self.plan.batch(step)[start : start + self.micro_batch_size]
        return [(d, sample_index(self.seed, d, draw, len(self.sources[d]))) for d, draw in slots]

    def __getitem__(self, k: int) -> dict:
        keys = self.keys(k)
        captions, images = [], []
        for d, i in keys:
            caption, image = self.sources[d].read(i)
            captions.append(caption)
            if self.read_images:
                images.append(torch.from_numpy(image.copy()))  # memmap views are read-only
        out = {"keys": torch.tensor(keys, dtype=torch.long), "captions": captions}  # keys (B, 2)
        if self.read_images:
            out["images"] = torch.stack(images)  # uint8 (B, 3, S, S)
        return out

    def __len__(self) -> int:  # an unbounded stream; the sampler decides what is read
        return 2**62


class StartAt(torch.utils.data.Sampler):
    """Micro-batch indices start, start+1, ... (resume without replaying the stream)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def build_loader(dataset: DecoderMicroBatches, start_step: int, train_iters: int, num_workers: int):
    acc = dataset.accumulation
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=StartAt(start_step * acc, train_iters * acc), num_workers=num_workers,
        persistent_workers=False,
    )
