"""Generation: prompt -> Emu's 32 regressed embeddings -> UNet with CFG (PNDM) -> VAE -> PNG."""

import pytest
import torch
from PIL import Image

from megatron_emu.config import get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.decoder.pipeline import EmuImagePipeline, save_pngs
from megatron_emu.decoder.unet import build_tiny_sd
from megatron_emu.model.emu import build_emu

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def pipe():
    emu = build_emu(TINY, seed=0)
    sd = build_tiny_sd(TINY.llm.hidden, seed=0)
    return EmuImagePipeline(emu, EmuTokenizer(build_tiny_tokenizer()), sd.unet, sd.vae, sd.scheduler_config)


def test_pipeline_writes_pngs_of_the_requested_size(pipe, tmp_path):
    context = [("", torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)), ("a photo of", None)]
    images = pipe(["a red circle", "two blue squares on the left"], [context, []], height=48, width=64,
                  num_inference_steps=3, guidance_scale=7.5, seed=3)
    assert images.shape == (2, 3, 48, 64) and images.dtype == torch.uint8
    paths = save_pngs(images, str(tmp_path))
    for path, image in zip(paths, images):
        with Image.open(path) as png:
            assert png.size == (64, 48) and png.format == "PNG"
            assert torch.equal(torch.from_numpy(__import__("numpy").asarray(png)).permute(2, 0, 1), image)
    again = pipe(["a red circle", "two blue squares on the left"], [context, []], height=48, width=64,
                 num_inference_steps=3, guidance_scale=7.5, seed=3)
    assert torch.equal(images, again)  # seeded
    with pytest.raises(ValueError, match="multiple of the VAE factor 8"):
        pipe.denoise(torch.zeros(1, 32, TINY.llm.hidden), 50, 64, 2)


def test_guidance_scale_one_equals_the_unguided_path(pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    conditions = torch.randn(2, 32, TINY.llm.hidden, generator=g)
    null = torch.randn(32, TINY.llm.hidden, generator=g)
    with torch.no_grad():
        unguided = pipe.unet(latents, 500, encoder_hidden_states=conditions).sample
        guided = pipe.predict_noise(latents, 500, conditions, null, 1.0)
        # The two-pass CFG formula at scale 1 gives the same noise up to rounding.
        eps_null = pipe.unet(latents, 500, encoder_hidden_states=null.expand_as(conditions)).sample
        formula = eps_null + 1.0 * (unguided - eps_null)
        strong = pipe.predict_noise(latents, 500, conditions, null, 7.5)
    assert torch.equal(guided, unguided)
    torch.testing.assert_close(formula, unguided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strong, eps_null + 7.5 * (unguided - eps_null), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(strong, unguided)
    cond = torch.randn(1, 32, TINY.llm.hidden, generator=g)
    a = pipe.denoise(cond, 32, 32, num_inference_steps=2, guidance_scale=1.0, seed=1)
    pipe._null, saved = torch.zeros_like(pipe.null()), pipe.null()
    b = pipe.denoise(cond, 32, 32, num_inference_steps=2, guidance_scale=1.0, seed=1)
    pipe._null = saved
    assert torch.equal(a, b)  # scale 1 never consults the null condition


def test_pipeline_refuses_a_unet_for_another_hidden_size():
    sd = build_tiny_sd(64, seed=0)
    with pytest.raises(ValueError, match="cross-attention dim is 64 but the Emu hidden size is 128"):
        EmuImagePipeline(build_emu(TINY, seed=0), None, sd.unet, sd.vae, sd.scheduler_config, where="decoder_dir")


def test_generate_image_cli(tmp_path):
    import importlib.util
    import os

    from safetensors.torch import save_file

    from megatron_emu.decoder.unet import save_sd_components

    emu_path = str(tmp_path / "emu.safetensors")
    save_file({k: v.contiguous() for k, v in build_emu(TINY, seed=0).state_dict().items()}, emu_path)
    save_sd_components(build_tiny_sd(TINY.llm.hidden, seed=0), str(tmp_path / "decoder"))
    context = tmp_path / "context.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(context)
    spec = importlib.util.spec_from_file_location("generate_image", os.path.join("tools", "generate_image.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    paths = cli.main(["--preset", "tiny", "--emu-load", emu_path, "--decoder", str(tmp_path / "decoder"),
                      "--prompt", "a red circle", "--prompt", "a green square", "--context-image", str(context),
                      "--num-inference-steps", "2", "--height", "32", "--width", "40", "--device", "cpu",
                      "--output-dir", str(tmp_path / "out")])
    assert len(paths) == 2
    for path in paths:
        with Image.open(path) as png:
            assert png.size == (40, 32)
