"""Planner, parameter side: how many parameters one rank of a layout holds.

Counted on a meta-device Emu (exact, no memory, any model size), then divided the way the
trainer divides them: tensor_parallel.py's plans shard a block's matmuls over TP and keep
the rest (norms, row-parallel biases, embeddings of the ViT) whole on every TP rank; an
image encoder placed on `images` (--vision-tensor-parallel, image_split.py) or one whose
heads TP does not divide is replicated whole on every TP rank. planner.py divides by DP
under FSDP.
"""

from __future__ import annotations

from megatron_emu.config import ModelConfig
from megatron_emu.memo import cached
from megatron_emu.parallel.image_split import choose_placement
from megatron_emu.parallel.mesh import ParallelDims


@cached
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of the encoder (ViT + ln_visual + Causal Former), the token embedding,
    one LLaMA layer, and the head (final norm, LM head, regression head)."""
    from megatron_emu.model.emu import build_emu

    emu = build_emu(config, device="meta")
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    return dict(encoder=count(emu.visual, emu.ln_visual, emu.causal_former), embed=count(emu.llm.tok_embeddings),
                layer=count(emu.llm.layers["0"]), head=count(emu.llm.norm, emu.llm.output, emu.regression_head),
                encoder_blocks=count(emu.visual.blocks, emu.causal_former.blocks),
                largest_block=max(count(emu.llm.layers["0"]), count(emu.visual.blocks[0]),
                                  count(emu.causal_former.blocks[0])),
                vision_block=count(emu.visual.blocks[0]), cf_block=count(emu.causal_former.blocks[0]),
                **tp_replicated_counts(emu))


def tp_replicated_counts(emu) -> dict[str, int]:
    """Parameters every TP rank holds whole, by tensor_parallel.py's plans: what no
    column/row-parallel plan covers (norms, the patch embedding, position embeddings,
    query tokens, the Causal Former projection) and row-parallel biases."""
    from megatron_emu.parallel import tensor_parallel as tpp

    def replicated(module, plan) -> int:
        n = 0
        for name, p in module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            style = plan.get(owner)
            if style is None or (isinstance(style, tpp.RowwiseParallel) and leaf == "bias"):
                n += p.numel()
        return n

    c = emu.causal_former
    outside = [p for m in (emu.visual, emu.ln_visual, c) for n, p in m.named_parameters()
               if not n.startswith("blocks.") and p is not c.relative_attention_bias.weight]
    return dict(layer_replicated=replicated(emu.llm.layers["0"], tpp.llama_layer_plan(False)),
                vision_block_replicated=replicated(emu.visual.blocks[0], tpp.vision_block_plan()),
                cf_block_replicated=replicated(c.blocks[0], tpp.causal_former_block_plan()),
                encoder_outside_replicated=sum(p.numel() for p in outside),
                head_replicated=sum(p.numel() for p in emu.llm.norm.parameters()))


def encoder_placement(model: ModelConfig, dims: ParallelDims, choice: str = "heads",
                      images_per_step: float = 0.0) -> dict[str, str]:
    """The trainer's placement of the ViT and the Causal Former (training/build.py's
    vision_placement): heads | images | replicated per encoder."""
    return choose_placement(choice, model, dims.tp, images_per_step)


def stage_layers(dims: ParallelDims, model: ModelConfig) -> tuple[int, ...]:
    return dims.stage_layers if dims.pp > 1 else (model.llm.layers,)


def rank_parameters(model: ModelConfig, dims: ParallelDims, stages: list[int],
                    placement: dict[str, str] | None = None) -> int:
    """Parameters one TP rank of these stages holds: sharded ones / TP, replicated whole.
    An encoder is head-split only when placed on `heads` (placement: encoder_placement's
    answer; None: --vision-tensor-parallel heads); on `images` or `replicated` every TP
    rank holds all of it."""
    placement = placement or encoder_placement(model, dims)
    counts, layers = parameter_counts(model), stage_layers(dims, model)
    tp, v, c = dims.tp, model.vision, model.causal_former
    shared = lambda total, whole: (total - whole) // tp + whole  # noqa: E731
    layer = shared(counts["layer"], counts["layer_replicated"])
    vis_block, cf_block = counts["vision_block"], counts["cf_block"]
    vision_split, cf_split = placement["visual"] == "heads", placement["causal_former"] == "heads"
    encoder = (v.layers * (shared(vis_block, counts["vision_block_replicated"]) if vision_split else vis_block)
               + c.layers * (shared(cf_block, counts["cf_block_replicated"]) if cf_split else cf_block))
    outside = counts["encoder"] - counts["encoder_blocks"]
    # Only the relative-position bias is split outside the blocks, and only with the heads.
    encoder += shared(outside, counts["encoder_outside_replicated"]) if cf_split else outside
    last = len(layers) - 1
    return sum(layers[s] * layer + (s == 0) * (encoder + counts["embed"] // tp)
               + (s == last) * shared(counts["head"], counts["head_replicated"]) for s in stages)
