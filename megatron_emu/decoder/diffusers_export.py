"""The decoder's UNet (megatron_emu/decoder checkpoints) -> a diffusers directory that
`UNet2DConditionModel.from_pretrained` loads.

The UNet's diffusers config travels in the decoder checkpoint (`unet_config`), so no
other input is needed; checkpoints written before it was stored need --unet-config
(the SD UNet directory the finetune started from: its config, with the re-sized
cross-attention width taken from the checkpoint).
"""

from __future__ import annotations

import os

from megatron_emu.convert.streams import atomic_output_dir
from megatron_emu.files import read_json


def _unet_config(state: dict, decoder_save: str, unet_config_dir: str) -> dict:
    if unet_config_dir:
        path = os.path.join(unet_config_dir, "config.json")
        config = read_json(path, "--unet-config must name a diffusers UNet directory")
    elif state.get("unet_config"):
        config = dict(state["unet_config"])
    else:
        raise ValueError(f"{decoder_save}: the checkpoint predates stored UNet configs; pass --unet-config "
                         "with the SD UNet directory the finetune started from")
    config["cross_attention_dim"] = state.get("cross_attention_dim", config.get("cross_attention_dim"))
    return config


def export_unet(decoder_save: str, output: str, unet_config_dir: str = "") -> None:
    """Newest decoder checkpoint under `decoder_save`; EMA weights when it has them."""
    from diffusers import UNet2DConditionModel

    from megatron_emu.decoder.checkpoint import load_checkpoint

    state = load_checkpoint(decoder_save)
    if state is None:
        raise ValueError(f"{decoder_save}: holds no decoder checkpoint (no `latest`)")
    unet = UNet2DConditionModel.from_config(_unet_config(state, decoder_save, unet_config_dir))
    weights = state["unet"]
    if state.get("ema") and state["ema"].get("shadow"):
        weights = {**weights, **state["ema"]["shadow"]}  # the averaged weights are the product
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{decoder_save}: UNet weights do not fit the UNet config: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_output_dir(output) as tmp:
        unet.save_pretrained(tmp)
