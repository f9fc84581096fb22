"""Measured per-block times for --pipeline-balance auto (--pipeline-balance-costs FILE).

The FLOPs model prices every matmul alike, but blocks do not run at one efficiency: the
ViT's 257-token attention, the Causal Former's 32-token blocks and the LM head's
cross-entropy over the vocabulary each reach their own fraction of the peak. A costs file
holds the forward + backward seconds of one block of each kind at the run's shapes
(tools/benchmark_throughput.py --measure-block-costs FILE writes it), and the balancer
then weighs the stages by measured time instead of FLOPs:

    stage = layers x llm_layer + [first] images x (ViT blocks x vision_block
            + Causal Former blocks x causal_former_block + encoder_rest) + [last] head

(per sample: llm_layer and head are per sequence, the encoder's per image). Only the
ratios matter. A block's time depends on its widths and the sequence length, not on how
many blocks the model stacks, so the file records those shapes and is refused for a
model or --seq-length that differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_emu.config import ModelConfig

FORMAT = "megatron_emu block costs v1"
PER_IMAGE = ("vision_block", "causal_former_block", "encoder_rest")  # ViT + ln_visual + CF around the blocks
PER_SEQUENCE = ("llm_layer", "head")  # head: final norm, LM head, regression head, loss
KINDS = PER_IMAGE + PER_SEQUENCE


def block_shapes(model: ModelConfig, seq_length: int) -> dict[str, int]:
    """What one block's time depends on (widths, tokens), not the number of blocks."""
    v, c, m = model.vision, model.causal_former, model.llm
    return dict(seq_length=seq_length, llm_hidden=m.hidden, llm_heads=m.heads, llm_ffn_dim=m.ffn_dim,
                vocab_size=m.padded_vocab_size, vision_width=v.width, vision_heads=v.heads, vision_mlp_dim=v.mlp_dim,
                vision_tokens=v.num_tokens, causal_former_d_model=c.d_model, causal_former_heads=c.heads,
                causal_former_ffn_dim=c.ffn_dim, query_tokens=c.num_query_tokens)


def write_costs(path: str | Path, model: ModelConfig, seq_length: int, seconds: dict[str, float],
                measured_with: dict) -> dict:
    """seconds: forward + backward of one block of each kind (per image / per sequence)."""
    document = {"format": FORMAT, "shapes": block_shapes(model, seq_length), "seconds": seconds,
                "measured_with": measured_with}
    Path(path).write_text(json.dumps(document, indent=1) + "\n")
    return document


def load_costs(path: str | Path, model: ModelConfig, seq_length: int) -> dict[str, float]:
    """The per-block seconds of `path`, checked against this run's shapes; any problem is a
    ValueError of one line naming the file."""
    where = f"--pipeline-balance-costs {path}"
    try:
        document = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{where}: not a block-costs file (no \"format\": \"{FORMAT}\"); "
                         f"write one with tools/benchmark_throughput.py --measure-block-costs")
    seconds, shapes = document.get("seconds"), document.get("shapes")
    if not isinstance(seconds, dict) or not isinstance(shapes, dict):
        raise ValueError(f"{where}: \"seconds\" and \"shapes\" must be objects")
    for kind in KINDS:
        value = seconds.get(kind)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: seconds.{kind} must be a number >= 0, got {value!r}")
    if seconds["llm_layer"] <= 0:
        raise ValueError(f"{where}: seconds.llm_layer must be > 0 (every stage holds LLaMA layers)")
    expected = block_shapes(model, seq_length)
    for key, value in expected.items():
        if shapes.get(key) != value:
            raise ValueError(f"{where}: measured at {key} = {shapes.get(key)!r}, this run has {value}; "
                             f"measure again at this run's shapes")
    return {kind: float(seconds[kind]) for kind in KINDS}


def measured_stage_cost(seconds: dict[str, float], model: ModelConfig, images_per_sample: float):
    """A balance.StageCost from measured block times: seconds of one sample through a stage."""
    encoder = images_per_sample * (model.vision.layers * seconds["vision_block"]
                                   + model.causal_former.layers * seconds["causal_former_block"]
                                   + seconds["encoder_rest"])

    def cost(layers: int, first: bool, last: bool) -> float:
        return layers * seconds["llm_layer"] + first * encoder + last * seconds["head"]
    return cost
