"""Finetune the Stable Diffusion v1.5 UNet on Emu's regressed embeddings (spec section 7).

Single process: `python finetune_decoder.py` (tiny preset on CPU, the bundled pairs, written to
runs/decoder_tiny); many GPUs: `torchrun --nproc-per-node 8 finetune_decoder.py --preset emu-14b ...`,
whose defaults are the paper's recipe. The result is `<--save>/decoder/` (diffusers unet/, vae/, scheduler/).
Bad input ends in one `error:` line and exit code 2, as in pretrain_emu.py.
"""

from megatron_emu.cli import end_process_group, setup_logging
from megatron_emu.decoder.arguments import parse_decoder_args
from megatron_emu.training.errors import exit_on_error


def main(argv=None):
    setup_logging()  # setup lines from rank 0 only
    config = exit_on_error(lambda: parse_decoder_args(argv))  # flags (and --help) before torch is imported
    from diffusers.utils import logging as diffusers_logging

    from megatron_emu.decoder.train import finetune

    diffusers_logging.set_verbosity_error()  # notices about accelerate and VAE dtypes, at every start
    return exit_on_error(lambda: finetune(config))


if __name__ == "__main__":
    main()
    end_process_group()  # on success only: an error exited above
