"""Pretrain Emu. Single process: `python pretrain_emu.py`; many: `torchrun ... pretrain_emu.py`.

Flags follow Megatron-LM (see `--help`); unset ones take the preset's recipe.
"""

import logging

from megatron_emu.arguments import parse_args
from megatron_emu.training.errors import exit_on_error


def main(argv=None):
    """Bad input exits 2 and a run that cannot go on exits 1, each with one `error:` line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its dataset loading is chatty
    config = exit_on_error(lambda: parse_args(argv))  # flags (and --help) before torch is imported
    from megatron_emu.training.train import pretrain

    return exit_on_error(lambda: pretrain(config), config.parallel.distributed_timeout_minutes)


if __name__ == "__main__":
    main()
