"""What Emu costs in FLOPs: per block, per forward, per training step, per pipeline stage.

FLOPs count matmuls only, 2 per multiply-add (Megatron-LM's convention; norms, softmax,
rotary and the loss are < 1% for these shapes). Every matmul is counted exactly:
  - forward: all projections, FFNs (SwiGLU = 3 matmuls, GELU / ReLU MLP = 2), attention
    scores and mixing (2 x Sq x Sk x inner each, the causal mask not subtracted, as
    Megatron and torch's FlopCounterMode count), the patch-embedding conv, the Causal
    Former's output projection, the LM head and the regression head;
  - backward: 2 x forward (input and weight gradients), except the patch-embedding conv,
    whose input (pixels) needs no gradient: 1 x;
  - recompute: full recompute reruns the forward of each recomputed block except its
    last matmul (FFN down-projection), whose output no gradient needs: torch's
    non-reentrant checkpoint stops recomputing once every saved tensor is back;
    selective reruns the attention core (scores and mixing) of every block.
Checked against torch.utils.flop_counter on the tiny preset (tests/test_flops.py). Plain
arithmetic on the model config: the log lines (training/metrics.py), the planner and the
pipeline balancer (parallel/balance.py) all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_emu.config import ModelConfig


def attention_flops(q_tokens: int, kv_tokens: int, width: int, kv_width: int, inner: int) -> tuple[int, int]:
    """(projection FLOPs, core FLOPs) of one attention: q/o on `width`, k/v on `kv_width`."""
    projections = 2 * 2 * q_tokens * width * inner + 2 * 2 * kv_tokens * kv_width * inner
    core = 2 * 2 * q_tokens * kv_tokens * inner  # QK^T and softmax @ V
    return projections, core


@dataclass
class BlockFlops:
    """Forward FLOPs of one transformer block, split so recompute can be priced."""

    dense: int  # projections + FFN
    core: int  # attention scores and mixing
    last: int  # the final FFN matmul (skipped by full recompute's early stop)

    @property
    def total(self) -> int:
        return self.dense + self.core


def vision_block_flops(config: ModelConfig) -> BlockFlops:  # per image
    v = config.vision
    proj, core = attention_flops(v.num_tokens, v.num_tokens, v.width, v.width, v.width)
    fc = 2 * v.num_tokens * v.width * v.mlp_dim
    return BlockFlops(proj + 2 * fc, core, fc)


def causal_former_block_flops(config: ModelConfig) -> BlockFlops:  # per image
    c, q = config.causal_former, config.causal_former.num_query_tokens
    inner = c.heads * c.head_dim
    self_proj, self_core = attention_flops(q, q, c.d_model, c.d_model, inner)
    cross_proj, cross_core = attention_flops(q, config.vision.num_tokens, c.d_model, config.vision.width, inner)
    ffn = 2 * q * c.d_model * c.ffn_dim
    return BlockFlops(self_proj + cross_proj + 2 * ffn, self_core + cross_core, ffn)


def llm_block_flops(config: ModelConfig, seq_length: int) -> BlockFlops:  # per sequence
    m = config.llm
    proj, core = attention_flops(seq_length, seq_length, m.hidden, m.hidden, m.hidden)
    ffn = 2 * seq_length * m.hidden * m.ffn_dim
    return BlockFlops(proj + 3 * ffn, core, ffn)


def patch_embed_flops(config: ModelConfig) -> int:  # per image
    v = config.vision
    return 2 * v.num_patches * 3 * v.patch_size**2 * v.width


def heads_flops(config: ModelConfig, seq_length: int) -> int:
    """LM head + regression head per sequence, and the Causal Former's projection per image."""
    m = config.llm
    return 2 * seq_length * m.hidden * (m.vocab_size + m.hidden)


def causal_former_proj_flops(config: ModelConfig) -> int:  # per image
    c = config.causal_former
    return 2 * c.num_query_tokens * c.d_model * config.llm.hidden


def forward_flops(config: ModelConfig, sequences: int, seq_length: int, images: int) -> int:
    """One forward pass over `sequences` sequences holding `images` images."""
    per_image = (patch_embed_flops(config) + config.vision.layers * vision_block_flops(config).total
                 + config.causal_former.layers * causal_former_block_flops(config).total
                 + causal_former_proj_flops(config))
    per_sequence = config.llm.layers * llm_block_flops(config, seq_length).total + heads_flops(config, seq_length)
    return images * per_image + sequences * per_sequence


def recompute_flops(config: ModelConfig, sequences: int, seq_length: int, images: int,
                    granularity: str | None, num_layers: int | None = None) -> int:
    """Extra forward FLOPs that activation recompute reruns in backward."""
    if granularity is None:
        return 0
    stacks = (  # (blocks in the stack, FLOPs of one block, how many times it runs)
        (config.vision.layers, vision_block_flops(config), images),
        (config.causal_former.layers, causal_former_block_flops(config), images),
        (config.llm.layers, llm_block_flops(config, seq_length), sequences),
    )
    extra = 0
    for layers, block, count in stacks:
        if granularity == "selective":
            extra += layers * block.core * count
        else:  # full: the first N blocks of each stack
            recomputed = min(layers, layers if num_layers is None else num_layers)
            extra += recomputed * (block.total - block.last) * count
    return extra


def training_flops(config: ModelConfig, sequences: int, seq_length: int, images: int,
                   recompute: str | None = None, recompute_num_layers: int | None = None) -> int:
    """Forward + backward (+ recompute) FLOPs of one optimizer step."""
    forward = forward_flops(config, sequences, seq_length, images)
    backward = 2 * forward - images * patch_embed_flops(config)  # pixels need no gradient
    return forward + backward + recompute_flops(config, sequences, seq_length, images, recompute, recompute_num_layers)


def stage_flops(config: ModelConfig, micro_batch_size: int, seq_length: int, images_per_sample: float,
                layers: int, first: bool, last: bool, recompute: str | None = None,
                recompute_num_layers: int | None = None) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro-batch through one pipeline stage
    holding `layers` LLaMA layers; the first stage also runs the ViT, the Causal Former and
    the patch embedding, the last one the LM and regression heads."""
    b, s = micro_batch_size, seq_length
    images = b * images_per_sample
    stacks = [(llm_block_flops(config, s), layers, b)]
    flops = 0.0
    if first:
        stacks += [(vision_block_flops(config), config.vision.layers, images),
                   (causal_former_block_flops(config), config.causal_former.layers, images)]
        flops += 3 * images * (patch_embed_flops(config) + causal_former_proj_flops(config))
    if last:
        flops += 3 * b * heads_flops(config, s)
    for block, count, runs in stacks:
        recomputed = count if recompute_num_layers is None else min(count, recompute_num_layers)
        extra = {None: 0, "selective": count * block.core, "full": recomputed * (block.total - block.last)}
        flops += runs * (3 * count * block.total + extra[recompute])
    return flops
