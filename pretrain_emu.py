"""Pretrain Emu. Single process: `python pretrain_emu.py`; many: `torchrun ... pretrain_emu.py`.

Flags follow Megatron-LM (see `--help`); unset ones take the preset's recipe.
"""

import logging

from megatron_emu.arguments import parse_args
from megatron_emu.training.train import pretrain


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its dataset loading is chatty
    return pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
