"""Model sizes: Emu's added tokens, the module configs and the presets (litgpt style: a
name maps to a ModelConfig). megatron_emu/config.py re-exports all of it with the run's
settings, so `from megatron_emu.config import ModelConfig` stays the one import to use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


# ---------------------------------------------------------------------------
# Special tokens (spec section 3): appended after the sentencepiece vocabulary.
# With LLaMA's 32000 pieces these are exactly the spec's ids 32000..32005.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens Emu adds to the base (sentencepiece) vocabulary."""

    base_vocab_size: int

    @property
    def pad(self) -> int:
        return self.base_vocab_size  # [PAD]

    @property
    def img_start(self) -> int:
        return self.base_vocab_size + 1  # [IMG]

    @property
    def img_end(self) -> int:
        return self.base_vocab_size + 2  # [/IMG]

    @property
    def image(self) -> int:
        return self.base_vocab_size + 3  # <image>

    @property
    def user(self) -> int:
        return self.base_vocab_size + 4  # [USER] (instruction tuning)

    @property
    def assistant(self) -> int:
        return self.base_vocab_size + 5  # [ASSISTANT] (instruction tuning)

    @property
    def ignored_in_ce(self) -> tuple[int, ...]:
        """Labels never trained with cross-entropy (spec section 4)."""
        return (self.pad, self.image, self.img_start, self.img_end)


SPECIAL_TOKEN_NAMES = ("[PAD]", "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]")
NUM_PRETRAIN_SPECIAL_TOKENS = 4  # [PAD] [IMG] [/IMG] <image>
NUM_INSTRUCT_SPECIAL_TOKENS = 6  # ... plus [USER] [ASSISTANT]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """EVA-CLIP ViT (spec section 1)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    layers: int = 40
    heads: int = 16
    mlp_dim: int = 6144
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + CLS


@dataclass
class CausalFormerConfig:
    """T5-decoder-style Causal Transformer (spec section 2)."""

    d_model: int = 768
    layers: int = 12
    heads: int = 12
    head_dim: int = 64
    ffn_dim: int = 3072
    num_query_tokens: int = 32
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6


ROPE_TYPES = ("default", "linear", "llama3")
# LLaMAConfig fields that change what the model computes but no tensor's shape: a checkpoint
# (or an imported LLaMA's config.json) states them, and whoever loads it computes with them.
LLAMA_FUNCTION_FIELDS = ("norm_eps", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
                         "rope_high_freq_factor", "rope_original_max_positions")


@dataclass
class LLaMAConfig:
    """LLaMA decoder (spec section 3). `vocab_size` includes the added tokens."""

    hidden: int = 5120
    layers: int = 40
    heads: int = 40
    ffn_dim: int = 13824
    base_vocab_size: int = 32000
    num_special_tokens: int = NUM_PRETRAIN_SPECIAL_TOKENS
    max_positions: int = 2048
    rope_theta: float = 10000.0
    # RoPE frequency scaling, in transformers' rope_parameters names: "default" (none),
    # "linear" (every frequency / rope_factor) or "llama3" (Llama 3.1: low frequencies /
    # rope_factor, high ones kept, smoothed in between; the three rope_* fields below).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    norm_eps: float = 1e-6  # RMSNorm epsilon (LLaMA-1: 1e-6, LLaMA-2: 1e-5)
    # Megatron's --make-vocab-size-divisible-by: the embedding and LM head get
    # padded_vocab_size rows (so TP can split them evenly); padded ids are never
    # predicted (the losses drop their logits). 1 = no padding, rows map 1:1 to HF.
    make_vocab_size_divisible_by: int = 1

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (choose from {', '.join(ROPE_TYPES)})")
        if self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.num_special_tokens

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class ModelConfig:
    """The whole Emu: ViT -> ln_visual -> Causal Former -> LLaMA (+ regression head)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    causal_former: CausalFormerConfig = field(default_factory=CausalFormerConfig)
    llm: LLaMAConfig = field(default_factory=LLaMAConfig)
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of dataclasses.asdict (a checkpoint's or an export's record). A field
        the record predates takes its default."""
        return cls(
            vision=VisionConfig(**d["vision"]),
            causal_former=CausalFormerConfig(**d["causal_former"]),
            llm=LLaMAConfig(**d["llm"]),
            init_std=d.get("init_std", 0.02),
        )

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(self.llm.base_vocab_size)

    @property
    def tokens_per_image(self) -> int:
        """[IMG] + <image> x num_query_tokens + [/IMG]."""
        return self.causal_former.num_query_tokens + 2


PRESETS: dict[str, ModelConfig] = {
    # Seconds on one CPU core; keeps every block type and the 32 query tokens.
    # Patch 28 keeps 224x224 inputs (the data format) at 64 patches.
    "tiny": ModelConfig(
        vision=VisionConfig(patch_size=28, width=64, layers=2, heads=4, mlp_dim=256),
        causal_former=CausalFormerConfig(d_model=64, layers=2, heads=4, head_dim=16, ffn_dim=256),
        llm=LLaMAConfig(hidden=128, layers=4, heads=4, ffn_dim=352, base_vocab_size=512, max_positions=512),
    ),
    # Single-GPU proxy: LLaMA ~1.1B (TinyLlama-like widths), a reduced ViT.
    "1b": ModelConfig(
        vision=VisionConfig(width=1024, layers=24, heads=16, mlp_dim=4096),
        causal_former=CausalFormerConfig(),
        llm=LLaMAConfig(hidden=2048, layers=22, heads=16, ffn_dim=5632),
    ),
    # The paper: EVA-CLIP-g/14 + t5-base-sized Causal Former + LLaMA-13B.
    "emu-14b": ModelConfig(),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may edit it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(
        PRESETS[name],
        vision=dataclasses.replace(PRESETS[name].vision),
        causal_former=dataclasses.replace(PRESETS[name].causal_former),
        llm=dataclasses.replace(PRESETS[name].llm),
    )
