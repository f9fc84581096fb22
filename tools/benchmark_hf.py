"""The transformers baseline of tools/benchmark_throughput.py's `--compare hf`: a training step
of LlamaForCausalLM with our LLaMA's shape, batch, precision and AdamW."""

from __future__ import annotations

import torch

from megatron_emu.config import TrainConfig
from megatron_emu.data.random_batches import random_batch
from megatron_emu.training.optim import build_optimizer
from megatron_emu.training.precision import Precision


def prepare_hf_llama(config: TrainConfig, device: torch.device):
    """A training step of LlamaForCausalLM with our LLaMA's shape, same batch and precision.
    With --compile each decoder layer is compiled, as ours compiles each block: both sides
    compiled is the fair comparison."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m, d, perf = config.model.llm, config.data, config.performance
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden, intermediate_size=m.ffn_dim, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.heads, max_position_embeddings=m.max_positions,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False,
        use_cache=False,  # training: no KV cache (transformers 5 builds one by default)
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(hf_config).to(device)
    if perf.recompute_granularity == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if perf.compile:
        for layer in model.model.layers:
            layer.compile(backend=perf.compile_backend)
    optimizer = build_optimizer(model, config.optimizer, perf.fused_kernels, device.type)  # the AdamW ours runs
    precision = Precision(perf, device.type)
    n_micro = d.global_batch_size // d.micro_batch_size
    batches = [random_batch(config.model, d.micro_batch_size, d.seq_length, 0, seed=i)["tokens"].to(device)
               for i in range(n_micro)]

    def step():
        optimizer.zero_grad(set_to_none=True)
        for tokens in batches:
            with precision.autocast():
                loss = model(input_ids=tokens, labels=tokens).loss
            precision.backward(loss / n_micro)
        precision.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
        precision.step(optimizer)

    step.optimizer = optimizer
    return step


def freeze_weights(*optimizers) -> None:
    """--compare hf: learning rate 0 on both sides (the same AdamW work, weights unchanged).
    Ours steps twice a round (image step and text-only step, one model: two 1b-width copies
    do not fit beside transformers' in CPU memory) to transformers' once; at the recipe's
    learning rate it drifted sooner into subnormal attention gradients, which x86 CPUs
    multiply many times slower (BENCHMARKS.md, "Denormals"). Frozen, both stay at their init."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = 0.0


if __name__ == "__main__":  # a module of tools/benchmark_throughput.py, not a tool of its own
    from megatron_emu.cli import refuse_run_as_tool

    refuse_run_as_tool(__file__, "--compare hf",
                       "python tools/benchmark_throughput.py --preset tiny --compare hf")
