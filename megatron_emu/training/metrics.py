"""FLOPs per iteration and Megatron-style throughput logging.

FLOPs count matmuls only (2 per multiply-add), as Megatron-LM does; training is
forward + backward = 3 x forward (4 x with full activation recompute).
"""

from dataclasses import dataclass

from megatron_emu.config import ModelConfig


def transformer_layer_flops(tokens: int, width: int, qkv_out: int, ffn_matmuls: int, ffn_dim: int, kv_tokens: int | None = None, kv_width: int | None = None) -> int:
    """Forward FLOPs of one attention + FFN layer over `tokens` query tokens.

    qkv_out: total width of the q/k/v projections (heads * head_dim);
    ffn_matmuls: 2 for GELU/ReLU MLPs, 3 for SwiGLU.
    kv_tokens/kv_width: for cross-attention (keys/values from another sequence).
    """
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    kv_width = width if kv_width is None else kv_width
    projections = 2 * tokens * width * qkv_out * 2  # q and o
    projections += 2 * kv_tokens * kv_width * qkv_out * 2  # k and v
    scores_and_mix = 2 * 2 * tokens * kv_tokens * qkv_out  # QK^T and attn @ V
    ffn = 2 * tokens * width * ffn_dim * ffn_matmuls
    return projections + scores_and_mix + ffn


def vision_flops_per_image(config: ModelConfig) -> int:
    v = config.vision
    patch_embed = 2 * v.num_patches * 3 * v.patch_size**2 * v.width
    layer = transformer_layer_flops(v.num_tokens, v.width, v.width, 2, v.mlp_dim)
    return patch_embed + v.layers * layer


def causal_former_flops_per_image(config: ModelConfig) -> int:
    c = config.causal_former
    inner = c.heads * c.head_dim
    q = c.num_query_tokens
    self_attn = transformer_layer_flops(q, c.d_model, inner, 0, 0)
    cross_attn = transformer_layer_flops(q, c.d_model, inner, 2, c.ffn_dim, config.vision.num_tokens, config.vision.width)
    projection = 2 * q * c.d_model * config.llm.hidden
    return c.layers * (self_attn + cross_attn) + projection


def llm_flops_per_sequence(config: ModelConfig, seq_length: int) -> int:
    m = config.llm
    layer = transformer_layer_flops(seq_length, m.hidden, m.hidden, 3, m.ffn_dim)
    heads = 2 * seq_length * m.hidden * (m.vocab_size + m.hidden)  # LM head + regression head
    return m.layers * layer + heads


def training_flops(config: ModelConfig, sequences: int, seq_length: int, images: int, recompute_full: bool = False) -> int:
    """Forward + backward FLOPs of one optimizer step."""
    forward = sequences * llm_flops_per_sequence(config, seq_length)
    forward += images * (vision_flops_per_image(config) + causal_former_flops_per_image(config))
    return (4 if recompute_full else 3) * forward


@dataclass
class IterationStats:
    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    lr: float
    global_batch_size: int
    lm_loss: float
    l2_loss: float
    grad_norm: float
    tokens_per_s: float
    tflops_per_device: float

    def format(self) -> str:
        """One Megatron-style log line."""
        return (
            f" iteration {self.iteration:8d}/{self.train_iters:8d} |"
            f" consumed samples: {self.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {self.elapsed_ms:.1f} |"
            f" learning rate: {self.lr:.3E} |"
            f" global batch size: {self.global_batch_size:5d} |"
            f" lm loss: {self.lm_loss:.6E} |"
            f" l2 loss: {self.l2_loss:.6E} |"
            f" grad norm: {self.grad_norm:.3f} |"
            f" tokens/s: {self.tokens_per_s:.1f} |"
            f" TFLOP/s/GPU: {self.tflops_per_device:.3f} |"
        )
