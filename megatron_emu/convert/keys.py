"""Parameter-name mappings. Ours follow emu.py (visual., ln_visual., causal_former., llm.,
regression_head.); the public layouts are transformers' LlamaForCausalLM, the EVA-CLIP
release (fused qkv + q_bias / v_bias) and the Emu v1 release (spec sections 1-3)."""

from __future__ import annotations

import re

import torch

# -- LLaMA: ours <-> transformers LlamaForCausalLM (rotate-half rotary: weights map 1:1) --
_LLAMA_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LLAMA_TOP = {
    "llm.tok_embeddings.weight": "model.embed_tokens.weight",
    "llm.norm.weight": "model.norm.weight",
    "llm.output.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"^llm\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def llama_to_hf(name: str) -> str | None:
    """`llm.*` name -> transformers name; None for names outside the LLM."""
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    m = _OURS_LAYER.match(name)
    if m and m.group(2) in _LLAMA_LAYER:
        return f"model.layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"
    return None


_HF_TOP = {v: k for k, v in _LLAMA_TOP.items()}
_HF_LAYER_NAMES = {v: k for k, v in _LLAMA_LAYER.items()}


def hf_to_llama(name: str) -> str | None:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"llm.layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"
    return None


# -- EVA ViT: ours (q_proj / k_proj / v_proj) <-> release (qkv.weight + q_bias + v_bias) --
_EVA_IGNORED = re.compile(
    r"(^|\.)(norm|fc_norm|head|rope)\.|relative_position_index|rel_pos_bias|k_bias$"
)
_EVA_QKV = re.compile(r"^blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias)$")


def eva_to_ours(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """One release tensor (names relative to the ViT) -> [(our name, tensor)]; None = not ours."""
    m = _EVA_QKV.match(name)
    if m:
        block, what = m.groups()
        prefix = f"visual.blocks.{block}.attn"
        if what == "qkv.weight":  # (3C, C): rows are q, k, v
            q, k, v = tensor.chunk(3, dim=0)
            return [(f"{prefix}.q_proj.weight", q), (f"{prefix}.k_proj.weight", k), (f"{prefix}.v_proj.weight", v)]
        return [(f"{prefix}.{what[0]}_proj.bias", tensor)]
    if _EVA_IGNORED.search(name):
        return None  # EVA's final norm / head: Emu does not use them (spec section 1)
    return [(f"visual.{name}", tensor)]


def ours_to_eva(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `visual.*` tensors -> the release layout (the inverse of eva_to_ours)."""
    out = {}
    for name, tensor in state.items():
        if not name.startswith("visual."):
            continue
        rel = name[len("visual."):]
        m = re.match(r"^blocks\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)$", rel)
        if not m:
            out[rel] = tensor
            continue
        block, which, kind = m.groups()
        prefix = f"blocks.{block}.attn"
        if kind == "weight" and which == "q":
            parts = [state[f"visual.{prefix}.{p}_proj.weight"] for p in "qkv"]
            out[f"{prefix}.qkv.weight"] = torch.cat(parts, dim=0)
        elif kind == "bias":
            out[f"{prefix}.{which}_bias"] = tensor
    return out


# -- Emu v1 release: visual.*, ln_visual.*, cformer.*, decoder.lm.* --------------------
_T5_LAYER = {
    "layer.0.SelfAttention.q.weight": "self_attn.q.weight",
    "layer.0.SelfAttention.k.weight": "self_attn.k.weight",
    "layer.0.SelfAttention.v.weight": "self_attn.v.weight",
    "layer.0.SelfAttention.o.weight": "self_attn.o.weight",
    "layer.0.layer_norm.weight": "self_attn_norm.weight",
    "layer.1.EncDecAttention.q.weight": "cross_attn.q.weight",
    "layer.1.EncDecAttention.k.weight": "cross_attn.k.weight",
    "layer.1.EncDecAttention.v.weight": "cross_attn.v.weight",
    "layer.1.EncDecAttention.o.weight": "cross_attn.o.weight",
    "layer.1.layer_norm.weight": "cross_attn_norm.weight",
    "layer.2.DenseReluDense.wi.weight": "ffn.wi.weight",
    "layer.2.DenseReluDense.wo.weight": "ffn.wo.weight",
    "layer.2.layer_norm.weight": "ffn_norm.weight",
}
_CFORMER_TOP = {
    "cformer.causal_tokens": "causal_former.query_embeds",
    "cformer.projection.weight": "causal_former.proj.weight",
    "cformer.projection.bias": "causal_former.proj.bias",
    "cformer.cformer.final_layer_norm.weight": "causal_former.norm.weight",
    # T5 keeps the relative-position table in block 0; all blocks share it.
    "cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "causal_former.relative_attention_bias.weight",
}
_CFORMER_BLOCK = re.compile(r"^cformer\.cformer\.block\.(\d+)\.(.+)$")
# T5's token embedding (unused: Emu feeds the learned queries) and dropout-free leftovers.
_EMU_IGNORED = re.compile(r"^cformer\.cformer\.embed_tokens\.|^decoder\.lm\.model\.rotary_emb\.|\.rotary_emb\.inv_freq$")


def emu_v1_to_ours(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """One Emu v1 tensor -> [(our name, tensor)]; None = deliberately unused; KeyError = unknown."""
    if name.startswith("visual."):
        return eva_to_ours(name[len("visual."):], tensor)
    if name.startswith("ln_visual."):
        return [(name, tensor)]
    if name in _CFORMER_TOP:
        return [(_CFORMER_TOP[name], tensor)]
    m = _CFORMER_BLOCK.match(name)
    if m and m.group(2) in _T5_LAYER:
        return [(f"causal_former.blocks.{m.group(1)}.{_T5_LAYER[m.group(2)]}", tensor)]
    if name == "decoder.lm.stu_regress_head.weight":
        return [("regression_head.weight", tensor)]
    if name.startswith("decoder.lm."):
        ours = hf_to_llama(name[len("decoder.lm."):])
        if ours is not None:
            return [(ours, tensor)]
    if _EMU_IGNORED.search(name):
        return None
    raise KeyError(name)
