"""COCO text-to-image FID's plumbing with a tiny Emu + tiny decoder: prompts drawn from a
captions file, one PNG per prompt (reused on a rerun, each with its own seed so a regenerated
one is identical), features -> Frechet distance to the reference statistics. The Inception
extractor is the optional `fid` extra (torchvision); here a fixed pixel-pooling extractor
stands in, and the tool says in one line what it needs when the extra is missing."""

import os
import sys

import numpy as np
import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.evaluation.coco_files import read_caption_prompts
from megatron_emu.evaluation.distributed import DataParallel
from megatron_emu.evaluation.frechet import fid_from_features
from megatron_emu.evaluation.text_to_image import features_of, image_path, reference_statistics, run_fid
from tests import eval_fixtures as fx

pytest.importorskip("diffusers")
TINY = get_preset("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pooled_pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) -> (N, 12): 2x2 average-pooled colours (a stand-in for Inception)."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1).double().numpy()


def captions_file(root: str, n: int = 6) -> str:
    rng = np.random.default_rng(0)
    return fx.write_json(os.path.join(root, "captions_val2014.json"), {
        "annotations": [{"id": 100 + i, "image_id": i, "caption": fx.sentence(rng) + "."} for i in range(n)]})


def test_prompts_are_a_seeded_draw_of_the_captions(tmp_path):
    path = captions_file(str(tmp_path))
    prompts = read_caption_prompts(path, 3, seed=0)
    assert len(prompts) == 3 and prompts == read_caption_prompts(path, 3, seed=0)
    assert {k for k, _ in prompts} <= {str(100 + i) for i in range(6)}
    with pytest.raises(ValueError, match="7 prompts asked, the file has 6"):
        read_caption_prompts(path, 7)


def test_fid_generates_each_prompt_once_and_scores_against_the_reference(tmp_path):
    from megatron_emu.decoder.pipeline import EmuImagePipeline
    from megatron_emu.decoder.unet import build_tiny_sd
    from megatron_emu.model.emu import build_emu

    sd = build_tiny_sd(TINY.llm.hidden, seed=1)
    pipe = EmuImagePipeline(build_emu(TINY, seed=0).eval(), EmuTokenizer(build_tiny_tokenizer()), sd.unet, sd.vae,
                            sd.scheduler_config)
    prompts = read_caption_prompts(captions_file(str(tmp_path)), 2, seed=0)
    real = [fx.image(str(tmp_path / "real" / f"{i}.png"), i) for i in range(5)]
    reference = reference_statistics("", str(tmp_path / "real"), pooled_pixels, str(tmp_path / "cache"))
    options = {"batch_size": 2, "height": 32, "width": 32, "steps": 2, "guidance_scale": 1.0, "seed": 0, "files": {}}
    out = str(tmp_path / "eval")
    first = run_fid(pipe, prompts, pooled_pixels, reference, out, DataParallel(), options, {"path": "x"}, "emu")
    pngs = [image_path(os.path.join(out, "coco_fid", "images"), k) for k, _ in prompts]
    expected = fid_from_features(features_of(pngs, pooled_pixels), features_of(sorted(real), pooled_pixels))
    assert first["score"] == pytest.approx(expected, rel=1e-9) and first["config"]["generated_now_by_rank0"] == 2
    assert first["scorer"]["extractor"] == "pooled_pixels"  # which network computed the features
    before = open(pngs[1], "rb").read()
    os.remove(pngs[1])  # as if killed before this image was written
    again = run_fid(pipe, prompts, pooled_pixels, reference, out, DataParallel(), dict(options, batch_size=1),
                    {"path": "x"}, "emu")
    assert again["config"]["generated_now_by_rank0"] == 1 and open(pngs[1], "rb").read() == before
    assert again["score"] == first["score"]


class DoubledPixels:
    """Another extractor (as other Inception weights would be): its own identity, other features."""
    identity = {"extractor": "doubled pooled pixels", "weights_xxh3": "0123"}

    def __call__(self, images):
        return 2 * pooled_pixels(images)


def test_reference_statistics_are_cached_per_extractor_and_image_files(tmp_path):
    real = [fx.image(str(tmp_path / "real" / f"{i}.png"), i) for i in range(4)]
    cache = str(tmp_path / "cache")
    mu, sigma = reference_statistics("", str(tmp_path / "real"), pooled_pixels, cache)
    assert np.array_equal(reference_statistics("", str(tmp_path / "real"), pooled_pixels, cache)[0], mu)
    assert len(os.listdir(cache)) == 1
    doubled = reference_statistics("", str(tmp_path / "real"), DoubledPixels(), cache)  # not the cached statistics
    assert np.allclose(doubled[0], 2 * mu) and np.allclose(doubled[1], 4 * sigma) and len(os.listdir(cache)) == 2
    fx.image(real[0], 99)  # a replaced reference image
    os.utime(real[0], ns=(1, 1))
    replaced = reference_statistics("", str(tmp_path / "real"), pooled_pixels, cache)
    assert not np.allclose(replaced[0], mu) and len(os.listdir(cache)) == 3


def test_tool_says_what_fid_needs_in_one_line(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import evaluate

    captions = captions_file(str(tmp_path))
    base = ["--task", "coco_fid", "--checkpoint", str(tmp_path), "--annotations", captions, "--num-prompts", "2",
            "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit, match="needs --decoder"):
        evaluate.main(base)
    with pytest.raises(SystemExit, match="--inception-weights \\(none\\): give the local FID Inception weights"):
        evaluate.main(base + ["--decoder", str(tmp_path)])
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"\0")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="need torch-fidelity: pip install 'megatron_emu\\[fid\\]'"):
            evaluate.main(base + ["--decoder", str(tmp_path), "--inception-weights", str(weights)])
    with pytest.raises(SystemExit, match="coco_fid is zero-shot only"):
        evaluate.main(base + ["--shots", "0", "4"])
