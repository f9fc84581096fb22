"""Finetune the Stable Diffusion v1.5 UNet on Emu's regressed embeddings (spec section 7).

Single process: `python finetune_decoder.py ...`; many GPUs: `torchrun --nproc-per-node 8 finetune_decoder.py ...`.
Defaults are the paper's recipe; the result is `<--save>/decoder/` (diffusers unet/, vae/, scheduler/).
"""

import logging

from megatron_emu.decoder.arguments import parse_decoder_args
from megatron_emu.decoder.train import finetune


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return finetune(parse_decoder_args(argv))


if __name__ == "__main__":
    main()
