"""Pretrain Emu. Single process: `python pretrain_emu.py`; many: `torchrun ... pretrain_emu.py`.

Flags follow Megatron-LM (see `--help`); unset ones take the preset's recipe. With no flags
at all (README command 1) the final checkpoint goes to runs/tiny/checkpoints.
"""

from megatron_emu.arguments import parse_args
from megatron_emu.cli import end_process_group, setup_logging
from megatron_emu.training.errors import exit_on_error


def main(argv=None):
    """Bad input exits 2 and a run that cannot go on exits 1, each with one `error:` line."""
    setup_logging()  # setup lines from rank 0 only
    config = exit_on_error(lambda: parse_args(argv))  # flags (and --help) before torch is imported
    from megatron_emu.training.train import pretrain

    return exit_on_error(lambda: pretrain(config), config.parallel.distributed_timeout_minutes)


if __name__ == "__main__":
    main()
    end_process_group()  # on success only: an error exited above
