"""Text generation from interleaved images, videos and text (paper Appendix C)."""

from megatron_emu.generation.api import EmuGenerator, TextResult
from megatron_emu.generation.decoding import DecodingConfig
from megatron_emu.generation.prompts import Video

__all__ = ["DecodingConfig", "EmuGenerator", "TextResult", "Video"]
