"""COCO captions: Karpathy's split file (dataset_coco.json) for captioning, and the official
captions file (captions_val2014.json) for the prompts of text-to-image FID.

dataset_coco.json: {"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
"split": "test" | "val" | "train" | "restval", "cocoid": 42, "sentences": [{"raw": "..."}]}]}
"""

from __future__ import annotations

import os
import random

from megatron_emu.evaluation.samples import Sample, existing, field_of, read_json


def read_karpathy(path: str, image_dir: str, splits: tuple[str, ...] = ("test",)) -> list[Sample]:
    """One sample per image of `splits`; references are the raw captions."""
    data = read_json(path, "Karpathy split (dataset_coco.json)")
    images = field_of(data, "images", path, "the file")
    samples = []
    for i, image in enumerate(images):
        where = f"images[{i}]"
        if field_of(image, "split", path, where) not in splits:
            continue
        sentences = field_of(image, "sentences", path, where)
        file = os.path.join(image_dir, image.get("filepath", ""), field_of(image, "filename", path, where))
        key = str(image.get("cocoid", image.get("imgid", image["filename"])))
        samples.append(Sample(key, existing(file, "image", path), references=[s["raw"] for s in sentences]))
    if not samples:
        raise ValueError(f"{path}: no image in split {'/'.join(splits)}")
    return samples


def read_caption_prompts(path: str, num_prompts: int, seed: int = 0) -> list[tuple[str, str]]:
    """(annotation id, caption) of `num_prompts` captions sampled from captions_val2014.json
    (the paper: 30k random validation captions), in a seeded, reproducible order."""
    data = read_json(path, "COCO captions (captions_val2014.json)")
    annotations = field_of(data, "annotations", path, "the file")
    prompts = [(str(field_of(a, "id", path, "an annotation")), field_of(a, "caption", path, "an annotation").strip())
               for a in annotations]
    if num_prompts > len(prompts):
        raise ValueError(f"{path}: {num_prompts} prompts asked, the file has {len(prompts)} captions")
    return random.Random(seed).sample(sorted(prompts), num_prompts)
