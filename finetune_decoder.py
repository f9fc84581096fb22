"""Finetune the Stable Diffusion v1.5 UNet on Emu's regressed embeddings (spec section 7).

Single process: `python finetune_decoder.py` (tiny preset on CPU, the bundled pairs, written to
runs/decoder_tiny); many GPUs: `torchrun --nproc-per-node 8 finetune_decoder.py --preset emu-14b ...`,
whose defaults are the paper's recipe. The result is `<--save>/decoder/` (diffusers unet/, vae/, scheduler/).
"""

import logging

from megatron_emu.decoder.arguments import parse_decoder_args
from megatron_emu.decoder.train import finetune


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its dataset loading is chatty
    config = parse_decoder_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # notices about accelerate and VAE dtypes, at every start
    return finetune(config)


if __name__ == "__main__":
    main()
