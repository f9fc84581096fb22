"""The decoder's UNet (megatron_emu/decoder checkpoints) -> a diffusers directory that
`UNet2DConditionModel.from_pretrained` loads."""

from __future__ import annotations

import json
import os

from megatron_emu.convert.streams import atomic_output_dir


def export_unet(decoder_save: str, output: str, unet_config_dir: str) -> None:
    """Newest decoder checkpoint under `decoder_save`; EMA weights when it has them."""
    from diffusers import UNet2DConditionModel

    from megatron_emu.decoder.checkpoint import load_checkpoint

    state = load_checkpoint(decoder_save)
    if state is None:
        raise ValueError(f"{decoder_save}: holds no decoder checkpoint (no `latest`)")
    config_path = os.path.join(unet_config_dir, "config.json")
    try:
        config = json.load(open(config_path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: --unet-config must name a diffusers UNet directory ({e})") from None
    config["cross_attention_dim"] = state.get("cross_attention_dim", config.get("cross_attention_dim"))
    unet = UNet2DConditionModel.from_config(config)
    weights = state["unet"]
    if state.get("ema") and state["ema"].get("shadow"):
        weights = {**weights, **state["ema"]["shadow"]}  # the averaged weights are the product
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{decoder_save}: UNet weights do not fit {config_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_output_dir(output) as tmp:
        unet.save_pretrained(tmp)
