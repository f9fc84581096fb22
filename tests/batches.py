"""Random but well-formed model inputs for tests that do not need the real loader."""

from megatron_emu.data.random_batches import random_batch

__all__ = ["random_batch"]
