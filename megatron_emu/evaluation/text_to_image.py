"""COCO text-to-image FID (paper Table 2): images generated from N validation captions (30k in
the paper, drawn at random with a fixed seed), Inception features, Frechet distance to the
reference statistics of COCO's real images.

- generation: Emu + the finetuned decoder (decoder/pipeline.py, as tools/generate_image.py),
  PNDM, classifier-free guidance 5.0 (the paper's scale for Emu), 50 steps; each prompt has
  its own seed (seed + its index), so the images do not depend on the batch or the DP split;
- per-sample cache: a prompt whose PNG exists is not generated again (PNGs are written to a
  temporary name and renamed, so a killed run leaves no half image);
- features: torch-fidelity's Inception-v3 (the TF-FID port, the same network as pytorch-fid)
  with its weights from a local file: the optional `fid` extra, since it needs torchvision;
- reference: pytorch-fid's statistics file (.npz: mu, sigma), or a directory of real images
  whose statistics are computed once and cached beside the results.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import torch
from PIL import Image

from megatron_emu.evaluation.frechet import feature_statistics, frechet_distance, load_statistics

GUIDANCE_SCALE = 5.0  # the paper's for Emu (SDv1.5: 3.0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InceptionFeatures:
    """uint8 (N, 3, H, W) -> (N, 2048) pool features of the FID Inception-v3 (torch-fidelity)."""

    def __init__(self, weights_path: str, device="cpu"):
        if not weights_path or not os.path.isfile(weights_path):
            raise ValueError(f"--inception-weights {weights_path or '(none)'}: give the local FID Inception weights file "
                             "(weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ValueError("FID's Inception features need torch-fidelity: pip install 'megatron_emu[fid]' "
                             "(it brings torchvision)") from None
        import torch_fidelity

        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=weights_path).eval().to(device)
        self.device = device
        # what computed the features: recorded in the JSON and part of the reference cache's key
        self.identity = {"extractor": f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat, 2048-d pool",
                         "weights": os.path.abspath(weights_path), "weights_xxh3": file_xxh3(weights_path)}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        (features,) = self.model(images.to(self.device))
        return features.double().cpu().numpy()


def file_xxh3(path: str) -> str:
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def extractor_identity(extractor) -> dict:
    """InceptionFeatures' identity; for another callable (tests' stand-ins) its name."""
    return getattr(extractor, "identity", None) or {"extractor": getattr(extractor, "__qualname__", type(extractor).__name__)}


def read_uint8(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W)


def features_of(paths: list[str], extractor, batch_size: int = 50) -> np.ndarray:
    """(N, D) features of the images at `paths`, in order; a batch holds images of one size."""
    out, batch = [], []
    for path in paths:
        image = read_uint8(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            out.append(extractor(torch.stack(batch)))
            batch = []
        batch.append(image)
    if batch:
        out.append(extractor(torch.stack(batch)))
    return np.concatenate(out)


def image_path(image_dir: str, key: str) -> str:
    return os.path.join(image_dir, f"{key}.png")


def generate_images(pipe, prompts: list[tuple[str, str]], image_dir: str, dp, batch_size: int, height: int,
                    width: int, steps: int, guidance_scale: float, seed: int) -> int:
    """This DP rank's share of the prompts -> PNGs; -> how many were generated (not cached)."""
    os.makedirs(image_dir, exist_ok=True)
    mine = [(i, key, caption) for i, (key, caption) in enumerate(prompts) if i % dp.size == dp.rank]
    todo = [p for p in mine if not os.path.exists(image_path(image_dir, p[1]))]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        conditions = pipe.conditions([caption for _, _, caption in batch])  # (B, 32, H)
        for row, (index, key, _) in enumerate(batch):
            image = pipe.denoise(conditions[row:row + 1], height, width, steps, guidance_scale, seed + index)[0]
            if dp.writes:
                path = image_path(image_dir, key)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
    return len(todo)


def reference_statistics(stats_path: str, image_dir: str, extractor, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    if stats_path:
        return load_statistics(stats_path)
    paths = sorted(p for p in glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_SUFFIXES))
    if len(paths) < 2:
        raise ValueError(f"--fid-reference-dir {image_dir or '(none)'}: needs real images (or give --fid-reference-stats)")
    # keyed by the images (path, size, mtime) and the extractor (its weights' hash): statistics from other
    # Inception weights, or of since-replaced images, are never reused
    images = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = hashlib.sha256(repr((images, sorted(extractor_identity(extractor).items()))).encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"reference-{key}.npz")
    if os.path.exists(cached):
        return load_statistics(cached)
    mu, sigma = feature_statistics(features_of(paths, extractor))
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(cached + ".tmp.npz", mu=mu, sigma=sigma)
    os.replace(cached + ".tmp.npz", cached)
    return mu, sigma


def fid_of_generated(prompts: list[tuple[str, str]], image_dir: str, reference: tuple, extractor) -> tuple[float, int]:
    """(FID of the generated images against the reference statistics, feature dimension)."""
    features = features_of([image_path(image_dir, key) for key, _ in prompts], extractor)
    mu, sigma = feature_statistics(features)
    if mu.shape != np.shape(reference[0]):
        raise ValueError(f"reference statistics have {np.shape(reference[0])[0]} features, the extractor gives {mu.shape[0]}")
    return frechet_distance(mu, sigma, *reference), mu.shape[0]


def run_fid(pipe, prompts: list[tuple[str, str]], extractor, reference: tuple, output_dir: str, dp, options: dict,
            identity: dict, model: str) -> dict:
    """Generate (or reuse) every prompt's image over the DP ranks, then rank 0 scores and writes the JSON.
    options: batch_size, height, width, steps, guidance_scale, seed, files."""
    from megatron_emu.evaluation.report import write_result

    image_dir = os.path.join(output_dir, "coco_fid", "images")
    generated = generate_images(pipe, prompts, image_dir, dp, options["batch_size"], options["height"],
                                options["width"], options["steps"], options["guidance_scale"], options["seed"])
    dp.barrier()
    result = {}
    if dp.first:
        fid, dims = fid_of_generated(prompts, image_dir, reference, extractor)
        result = {"task": "coco_fid", "setting": "0", "metric": "FID", "score": fid, "metrics": {"FID": fid},
                  "num_samples": len(prompts), "scorer": {"features": f"{dims}-d", "formula": "frechet.py (eigh)",
                             **extractor_identity(extractor)},
                  "checkpoint": identity,
                  "config": {"model": model, **{k: v for k, v in options.items()}, "generated_now_by_rank0": generated},
                  "samples": [{"key": key, "prompt": caption, "image": image_path(image_dir, key)}
                              for key, caption in prompts]}
        write_result(output_dir, "coco_fid", "0", result)
    dp.barrier()
    return result
