"""Tensor (+ sequence) parallelism: DTensor plans keyed by module name, one per module family.

Megatron's scheme, in torch.distributed.tensor.parallel terms:
- LLaMA: wq/wk/wv and w1/w3 column-parallel (split along heads / FFN), wo and w2
  row-parallel; vocab-parallel token embedding and LM head; the LM head's logits stay
  sharded along the vocabulary for `loss_parallel` (no full-vocab gather).
  With --sequence-parallel the norms and residual stream hold S/TP tokens per rank.
- EVA ViT (16 heads) and Causal Former (12 heads): split along heads and FFN when
  TP divides the heads, otherwise replicated (a logged note); no sequence parallel
  (257 and 32 tokens are too short to be worth it). Or, per module, replicated with the
  images split across TP ranks instead (--vision-tensor-parallel, image_split.py).
- Regression head: column-parallel, its output sharded along the hidden dim; the l2
  sums are reduced over TP in parallel/loss.py.

The stage may lack parts (pipeline parallelism): every plan skips what is absent.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megatron_emu.config import ModelConfig
from megatron_emu.parallel.image_split import apply_image_split, choose_placement

log = logging.getLogger("megatron_emu")


def llama_layer_plan(sequence_parallel: bool) -> dict:
    """One LLaMA block. With SP the block's input and output are sequence-sharded (Shard(1))."""
    if not sequence_parallel:
        return {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
    return {
        "attention_norm": SequenceParallel(),
        # All-gather the sequence before attention (args: x, rope).
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),  # reduce-scatter back to S/TP
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def llama_ends_plan(part: nn.Module, sequence_parallel: bool) -> dict:
    """Embedding (first stage) and final norm + heads (last stage)."""
    plan = {}
    if part.llm.tok_embeddings is not None:
        # Vocab-parallel: each rank looks up its rows, the partial sums are all-reduced.
        # Replicated output: the image splice runs on the full sequence.
        plan["llm.tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if part.llm.output is not None:
        hidden_layout = Shard(1) if sequence_parallel else Replicate()
        if sequence_parallel:
            plan["llm.norm"] = SequenceParallel()
        # Logits stay vocab-sharded DTensors for loss_parallel; the regression output
        # stays hidden-sharded for the TP-reduced l2.
        plan["llm.output"] = ColwiseParallel(input_layouts=hidden_layout, output_layouts=Shard(-1), use_local_output=False)
        plan["regression_head"] = ColwiseParallel(input_layouts=hidden_layout, output_layouts=Shard(-1), use_local_output=False)
    return plan


def vision_block_plan() -> dict:
    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(),
    }


def causal_former_block_plan() -> dict:
    plan = {}
    for attn in ("self_attn", "cross_attn"):
        plan.update({f"{attn}.q": ColwiseParallel(), f"{attn}.k": ColwiseParallel(),
                     f"{attn}.v": ColwiseParallel(), f"{attn}.o": RowwiseParallel()})
    plan.update({"ffn.wi": ColwiseParallel(), "ffn.wo": RowwiseParallel()})
    return plan


def apply_tensor_parallel(part: nn.Module, tp_mesh: DeviceMesh, config: ModelConfig, sequence_parallel: bool,
                          vision_placement: dict[str, str] | None = None) -> None:
    """Shard one model part (the whole Emu, or one pipeline stage) in place over `tp_mesh`.
    vision_placement: image_split.choose_placement's answer (None: split heads where they divide)."""
    tp = tp_mesh.size()
    stacks = part.transformer_stacks()
    if "vision" in stacks:
        placement = vision_placement or choose_placement("heads", config, tp, 0)
        parallelize_vision(part, tp_mesh, config, placement)
        apply_image_split(part, tp_mesh.get_group(), placement)
    layers = stacks["llm"]
    for layer in layers:
        parallelize_module(layer, tp_mesh, llama_layer_plan(sequence_parallel))
    if sequence_parallel and layers:
        # The stage's input is the full sequence (after the splice, or received from the
        # previous stage): scatter it; a stage that hands on to another gathers it back.
        parallelize_module(layers[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None), use_local_output=True))
        if part.llm.output is None:
            parallelize_module(layers[-1], tp_mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    if sequence_parallel and not layers and part.llm.output is not None:
        raise ValueError("--sequence-parallel needs at least one LLaMA layer on the last pipeline stage")
    parallelize_module(part, tp_mesh, llama_ends_plan(part, sequence_parallel))


def parallelize_vision(part: nn.Module, tp_mesh: DeviceMesh, config: ModelConfig, placement: dict[str, str]) -> None:
    """EVA ViT and Causal Former placed on `heads`: split along heads (replicated where TP does
    not divide them); placed on `images`: replicated, each rank encoding its share (image_split.py)."""
    v, c, tp = config.vision, config.causal_former, tp_mesh.size()
    if placement["visual"] == "heads":
        for block in part.transformer_stacks()["vision"]:
            parallelize_module(block, tp_mesh, vision_block_plan())
    elif placement["visual"] == "replicated":
        log.info("EVA ViT: %d heads / MLP %d not divisible by TP=%d; replicated across TP", v.heads, v.mlp_dim, tp)
    if placement["causal_former"] == "heads":
        for block in part.transformer_stacks()["causal_former"]:
            parallelize_module(block, tp_mesh, causal_former_block_plan())
        # The shared relative-position bias table holds one column per head: split it
        # like the heads so each rank's bias matches its local heads.
        parallelize_module(part.causal_former, tp_mesh, {"relative_attention_bias": ColwiseParallel(input_layouts=Replicate())})
    elif placement["causal_former"] == "replicated":
        log.info("Causal Former: %d heads / FFN %d not divisible by TP=%d; replicated across TP", c.heads, c.ffn_dim, tp)
