"""Our LLaMAConfig <-> a transformers LlamaForCausalLM config.json, with nothing lost.

Every field a LLaMA config.json may hold is in one of four groups:
- shape: must equal the preset's (a checkpoint of another size is refused);
- carried: becomes part of our model config, so training, checkpoints and the export
  compute with it and state it: rms_norm_eps, rope_theta, rope scaling ("linear",
  "llama3"), read from transformers' two layouts (< 5: rope_theta + rope_scaling;
  >= 5: rope_parameters);
- fixed: our LLaMA computes one value only (silu, no biases, untied head, ...): any other
  is refused;
- no effect on the logits (token ids, dtype, max_position_embeddings: rotary positions
  below both lengths are the same, and ours refuses longer sequences).
A field in none of the groups is refused too: it might change the function.
"""

from __future__ import annotations

import dataclasses
import os

from megatron_emu.config import LLaMAConfig
from megatron_emu.files import read_json

ARCHITECTURES = ["LlamaForCausalLM"]  # what transformers writes for this model

_SHAPE = {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
          "intermediate_size": "ffn_dim"}
# field -> the only value our LLaMA computes (each is also transformers' default when absent)
_FIXED = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "model_type": "llama",
}
_FIXED_KWARGS = {k: v for k, v in _FIXED.items() if k != "model_type"}  # LlamaConfig sets model_type
_CARRIED = ("rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters")  # ours: LLAMA_FUNCTION_FIELDS
_NO_EFFECT = frozenset({
    "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
    # pretraining_tp > 1 splits the projections into slices in transformers < 5: the same sums.
    "pretraining_tp",
    # PretrainedConfig's generic fields (outputs returned, task labels)
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class",
})
_ROPE_KEYS = {  # rope type -> its parameters (transformers' names) -> ours
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_positions"},
}
_DEFAULTS = LLaMAConfig()


def llm_config_from_hf(path: str, llm: LLaMAConfig) -> LLaMAConfig:
    """`llm` (the preset's) with what `path`/config.json carries, or one error naming every
    field that differs in shape or that our LLaMA cannot compute."""
    file = os.path.join(path, "config.json")
    hf = read_json(file, "unreadable")
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    _check_shape(file, hf, llm)
    refused = [f"{k}: checkpoint {hf[k]!r} vs model {v!r}" for k, v in _FIXED.items() if k in hf and hf[k] != v]
    known = set(_SHAPE) | set(_FIXED) | set(_CARRIED) | _NO_EFFECT | {"vocab_size", "num_key_value_heads", "head_dim"}
    refused += [f"{k}: checkpoint {hf[k]!r} is a field the converter does not know (it may change the model)"
                for k in hf if k not in known]
    rope, rope_refused = _rope_fields(hf)
    refused += rope_refused
    if refused:
        raise ValueError(f"{file}: unsupported by our LLaMA: {'; '.join(refused)}")
    return dataclasses.replace(llm, norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS.norm_eps)), **rope)


def _check_shape(file: str, hf: dict, llm: LLaMAConfig) -> None:
    expected = {k: getattr(llm, ours) for k, ours in _SHAPE.items()}
    expected.update(num_key_value_heads=llm.heads, head_dim=llm.head_dim)
    actual = dict(hf)
    actual.setdefault("num_key_value_heads", hf.get("num_attention_heads"))  # absent = no GQA
    if actual.get("head_dim") is None and hf.get("num_attention_heads"):
        actual["head_dim"] = hf.get("hidden_size", 0) // hf["num_attention_heads"]
    diffs = [f"{k}: checkpoint {actual.get(k)} vs model {v}" for k, v in expected.items() if actual.get(k) != v]
    if hf.get("vocab_size") not in (llm.base_vocab_size, llm.vocab_size):
        diffs.append(f"vocab_size: checkpoint {hf.get('vocab_size')} vs model {llm.base_vocab_size} "
                     f"(+{llm.num_special_tokens} added)")
    if diffs:
        raise ValueError(f"{file}: a different model size: {'; '.join(diffs)}")


def _rope_fields(hf: dict) -> tuple[dict, list[str]]:
    """Our rope_* fields from either transformers layout, and what cannot be carried."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", _DEFAULTS.rope_theta))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in _ROPE_KEYS:
        return {}, [f"rope type: checkpoint {kind!r} vs model one of {', '.join(map(repr, _ROPE_KEYS))}"]
    refused = []
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        refused.append(f"partial_rotary_factor: checkpoint {partial!r} vs model 1.0 (every dimension rotates)")
    if kind == "llama3" and "max_position_embeddings" in hf:  # transformers' fallback for the pretraining length
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    fields = {"rope_theta": float(theta), "rope_type": kind}
    for name, ours in _ROPE_KEYS[kind].items():
        if name not in params:
            refused.append(f"rope {kind}: checkpoint lacks {name} vs model needs it")
            continue
        fields[ours] = type(getattr(_DEFAULTS, ours))(params.pop(name))
    refused += [f"rope {kind} {k}: checkpoint {v!r} is a parameter the converter does not know" for k, v in params.items()]
    # Fields this rope type does not use keep their defaults: a config compares equal to a fresh one.
    unused = {ours for keys in _ROPE_KEYS.values() for ours in keys.values()} - set(_ROPE_KEYS[kind].values())
    fields.update({ours: getattr(_DEFAULTS, ours) for ours in unused})
    return fields, refused


def rope_scaling(llm: LLaMAConfig) -> dict | None:
    """Our rope fields as transformers' rope_scaling (None: plain RoPE)."""
    if llm.rope_type == "default":
        return None
    return {"rope_type": llm.rope_type, **{name: getattr(llm, ours) for name, ours in _ROPE_KEYS[llm.rope_type].items()}}


def hf_llama_config(llm: LLaMAConfig, special_ids: dict[str, int]):
    """The transformers LlamaConfig that computes what our LLaMA computes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=ARCHITECTURES,
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.ffn_dim,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.heads,
        head_dim=llm.head_dim, max_position_embeddings=llm.max_positions, rms_norm_eps=llm.norm_eps,
        rope_theta=llm.rope_theta, rope_scaling=rope_scaling(llm),
        **_FIXED_KWARGS,
        bos_token_id=1, eos_token_id=2, pad_token_id=special_ids["[PAD]"], torch_dtype="float32",
    )

