"""Our tiny Emu written in the official releases' key layouts (test helpers):
Emu v1 (github baaivision/Emu, Emu1/models/modeling_emu.py: `visual`, `ln_visual`, `cformer` (a
transformers T5 decoder stack), `decoder.lm` (LlamaForCausalLM + stu_regress_head)) and Emu-I
(the same with `decoder.lm` wrapped by peft.get_peft_model, LoRA on q, k, v, o unmerged)."""

from __future__ import annotations

import torch

from megatron_emu.convert.keys import llama_to_hf, ours_to_eva


def emu_v1_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under its Emu v1 release name."""
    sd, config = model.state_dict(), model.config
    out = {f"visual.{k}": v for k, v in ours_to_eva(sd).items()}
    out.update({k: v for k, v in sd.items() if k.startswith("ln_visual.")})
    out["cformer.causal_tokens"] = sd["causal_former.query_embeds"]
    out["cformer.projection.weight"] = sd["causal_former.proj.weight"]
    out["cformer.projection.bias"] = sd["causal_former.proj.bias"]
    out["cformer.cformer.final_layer_norm.weight"] = sd["causal_former.norm.weight"]
    out["cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = sd["causal_former.relative_attention_bias.weight"]
    out["cformer.cformer.embed_tokens.weight"] = torch.zeros(8, config.causal_former.d_model)  # unused by Emu
    for i in range(config.causal_former.layers):
        b, t = f"causal_former.blocks.{i}.", f"cformer.cformer.block.{i}.layer."
        for p in "qkvo":
            out[f"{t}0.SelfAttention.{p}.weight"] = sd[f"{b}self_attn.{p}.weight"]
            out[f"{t}1.EncDecAttention.{p}.weight"] = sd[f"{b}cross_attn.{p}.weight"]
        out[f"{t}0.layer_norm.weight"] = sd[f"{b}self_attn_norm.weight"]
        out[f"{t}1.layer_norm.weight"] = sd[f"{b}cross_attn_norm.weight"]
        out[f"{t}2.layer_norm.weight"] = sd[f"{b}ffn_norm.weight"]
        out[f"{t}2.DenseReluDense.wi.weight"] = sd[f"{b}ffn.wi.weight"]
        out[f"{t}2.DenseReluDense.wo.weight"] = sd[f"{b}ffn.wo.weight"]
    out.update({f"decoder.lm.{llama_to_hf(k)}": v for k, v in sd.items() if llama_to_hf(k)})
    out["decoder.lm.stu_regress_head.weight"] = sd["regression_head.weight"]
    return out


def hf_llama_of(model):
    """A transformers LlamaForCausalLM holding `model`'s LLM (its whole vocabulary)."""
    import transformers

    from megatron_emu.convert.export import hf_llama_config

    llm = model.config.llm
    hf = transformers.LlamaForCausalLM(hf_llama_config(llm, {"[PAD]": llm.base_vocab_size})).eval()
    hf.load_state_dict({llama_to_hf(k): v for k, v in model.state_dict().items() if llama_to_hf(k)})
    return hf


def emu_i_state(model, rank: int = 8, alpha: float = 16.0, seed: int = 0, old_peft: bool = False):
    """(the released Emu-I's state dict for `model` with random unmerged LoRA, the PEFT LLM it
    holds). old_peft: the names of PEFT versions before `base_layer` and adapter names."""
    import peft

    hf = hf_llama_of(model)
    hf.stu_regress_head = torch.nn.Linear(model.config.llm.hidden, model.config.llm.hidden, bias=False)
    hf.stu_regress_head.weight.data.copy_(model.regression_head.weight)
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(hf, lora).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0: make the adapters matter
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    state = {k: v for k, v in emu_v1_state(model).items() if not k.startswith("decoder.lm.")}
    for name, tensor in wrapped.state_dict().items():
        if old_peft:
            name = name.replace(".base_layer.", ".").replace(".default.", ".")
        state[f"decoder.lm.{name}"] = tensor.clone()
    return state, wrapped
