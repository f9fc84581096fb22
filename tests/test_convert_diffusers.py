"""--to diffusers: a decoder checkpoint (written by the decoder's own saver) exports to a
directory that UNet2DConditionModel.from_pretrained loads, with identical outputs."""

import importlib.util
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from megatron_emu.decoder.checkpoint import iteration_dir  # noqa: E402
from megatron_emu.decoder.ema import EMA  # noqa: E402
from megatron_emu.decoder.train import save_on_rank0  # noqa: E402
from megatron_emu.decoder.unet import build_tiny_sd, resize_cross_attention  # noqa: E402

EMU_HIDDEN, SD_TEXT_DIM = 128, 32  # tiny Emu's hidden size; the "pretrained" SD's text width


def convert(argv: list[str]) -> None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


@pytest.fixture(scope="module")
def decoder_save(tmp_path_factory):
    """A finetuned-looking decoder: SD UNet re-sized to Emu's width, trained a little, with EMA."""
    root = tmp_path_factory.mktemp("decoder")
    sd = build_tiny_sd(SD_TEXT_DIM, seed=1)
    sd.unet.save_pretrained(str(root / "sd-unet"))  # the SD UNet the finetune started from
    unet = sd.unet
    resize_cross_attention(unet, EMU_HIDDEN)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMA(unet, decay=0.5)
    with torch.no_grad():  # stand-in for training steps: weights and their average move apart
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ema.update(unet)
    save = str(root / "save")
    save_on_rank0(save, 3, unet, optimizer, ema, {"noise": torch.Generator().manual_seed(0)}, rank=0, world=1)
    return save, unet.eval(), ema, str(root / "sd-unet")


def outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, h, w) latents
    condition = torch.randn(2, 6, EMU_HIDDEN, generator=g)  # (B, N, H) Emu's regressed embeddings
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=condition).sample


def test_export_reloads_in_diffusers_with_identical_outputs(decoder_save, tmp_path):
    save, unet, ema, _ = decoder_save
    out = str(tmp_path / "unet")
    convert(["--to", "diffusers", "--input", save, "--output", out])  # no --unet-config needed
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
    assert reloaded.config.cross_attention_dim == EMU_HIDDEN
    with ema.swapped_into(unet):  # the product is the averaged weights
        assert torch.equal(outputs(reloaded), outputs(unet))
    assert not torch.equal(outputs(reloaded), outputs(unet))  # ... not the last trained ones


def test_a_checkpoint_without_a_stored_config_needs_unet_config(decoder_save, tmp_path):
    save, unet, ema, sd_unet = decoder_save
    old = str(tmp_path / "old")
    state = torch.load(os.path.join(iteration_dir(save, 3), "state.pt"), weights_only=False)
    del state["unet_config"]  # as written before the config was stored
    os.makedirs(iteration_dir(old, 3))
    torch.save(state, os.path.join(iteration_dir(old, 3), "state.pt"))
    with open(os.path.join(old, "latest"), "w") as f:
        f.write("iter_0000003")
    from megatron_emu.decoder.diffusers_export import export_unet

    with pytest.raises(ValueError, match="predates stored UNet configs; pass --unet-config"):
        export_unet(old, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    out = str(tmp_path / "unet")
    convert(["--to", "diffusers", "--input", old, "--unet-config", sd_unet, "--output", out])
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out).eval()  # SD's config, Emu's width
    with ema.swapped_into(unet):
        assert torch.equal(outputs(reloaded), outputs(unet))
