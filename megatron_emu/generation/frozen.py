"""Frozen modules: eval mode and no gradients, so their weights stay bit-identical (the
inference build's Emu, the decoder's Emu and VAE, evaluation's models). Loading them is
generation/loading.py's (the decoder's `--emu-load`: loading.load_emu)."""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """eval mode, no grads: frozen weights must stay bit-identical (and dropout off)."""
    module.requires_grad_(False)
    return module.eval()
