"""Inputs for one end-to-end `tools/evaluate.py --task coco_fid` run with torch-fidelity's real
Inception-v3 code (README "Evaluating a checkpoint"); needs the `fid` extra (torchvision), so it is
no test: run it in a venv that has torch-fidelity.

    python -m tests.fid_demo DIR     # writes DIR/{ckpt, decoder, captions_val2014.json, real/, weights-...pth}
    python -m tests.fid_demo DIR --compare EVAL_DIR   # torch-fidelity's own FID of the same images and weights

The Inception weights are RANDOM (the real file is a download): torch-fidelity's
FeatureExtractorInceptionV3 state dict, saved with torch.save as its
weights-inception-2015-12-05-6726825d.pth is, convolutions He-initialised and every BatchNorm's
running statistics calibrated on noise images so that activations neither vanish nor explode.
An FID from these weights measures nothing; the run shows the real network's code path works.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import numpy as np
import torch

from tests import eval_fixtures as fx

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def random_inception_weights(path: str, seed: int = 0, calibration_batches: int = 2) -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with mock.patch.object(torch, "load", return_value=None), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # build the layout, load nothing
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.reset_parameters()
            module.momentum = None  # cumulative average over the calibration batches
    torch.nn.init.normal_(model.fc.weight, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator))
    model.eval()
    torch.save(model.state_dict(), path)
    return path


def write_inputs(root: str) -> dict:
    from megatron_emu.config import get_preset
    from megatron_emu.convert.imports import import_checkpoint
    from megatron_emu.decoder.unet import build_tiny_sd, save_sd_components

    tiny = get_preset("tiny")
    os.makedirs(root, exist_ok=True)
    import_checkpoint([], tiny, os.path.join(root, "ckpt"), seed=0)
    save_sd_components(build_tiny_sd(tiny.llm.hidden, seed=1), os.path.join(root, "decoder"))
    rng = np.random.default_rng(0)
    captions = fx.write_json(os.path.join(root, "captions_val2014.json"), {
        "annotations": [{"id": 100 + i, "image_id": i, "caption": fx.sentence(rng) + "."} for i in range(8)]})
    for i in range(6):
        fx.image(os.path.join(root, "real", f"COCO_val2014_{i:012d}.png"), 300 + i)
    weights = random_inception_weights(os.path.join(root, WEIGHTS_NAME))
    return {"checkpoint": os.path.join(root, "ckpt"), "decoder": os.path.join(root, "decoder"),
            "annotations": captions, "fid_reference_dir": os.path.join(root, "real"), "inception_weights": weights}


def torch_fidelity_fid(generated_dir: str, real_dir: str, weights: str) -> float:
    """torch-fidelity's calculate_metrics (its own statistics and Frechet distance) on two image folders."""
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=generated_dir, input2=real_dir, fid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights, cuda=False, cache=False, verbose=False, samples_find_deep=True)
    return metrics["frechet_inception_distance"]


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "fid_demo"
    if "--compare" in sys.argv:
        eval_dir = sys.argv[sys.argv.index("--compare") + 1]
        print("torch-fidelity FID:", torch_fidelity_fid(os.path.join(eval_dir, "coco_fid", "images"),
                                                       os.path.join(root, "real"), os.path.join(root, WEIGHTS_NAME)))
    else:
        for name, path in write_inputs(root).items():
            print(f"--{name.replace('_', '-')} {path}")
