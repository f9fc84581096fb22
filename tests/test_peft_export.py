"""--to peft: our adapters load in peft.PeftModel on our Hugging Face export of the base,
with the same logits as our model (fp32, < 1e-4)."""

import dataclasses
import json
import os

import pytest
import torch

from megatron_emu.config import CheckpointConfig, LoRAConfig, NUM_INSTRUCT_SPECIAL_TOKENS, OptimizerConfig, TrainConfig, get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.model.emu import build_emu
from megatron_emu.model.init import init_parameters
from megatron_emu.model.lora import LoRASpec, apply_lora
from megatron_emu.training.checkpoint import Checkpointer
from megatron_emu.training.instruct import init_chat_token_rows, save_full_checkpoint
from megatron_emu.training.optim import build_optimizer
from tools.convert_checkpoint import main as convert

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_peft_adapter_logit_parity(tmp_path):
    model_config = get_preset("tiny")
    model_config.llm.num_special_tokens = NUM_INSTRUCT_SPECIAL_TOKENS
    tok_path = build_tiny_tokenizer(str(tmp_path / "tok"))
    tokenizer = EmuTokenizer(tok_path, NUM_INSTRUCT_SPECIAL_TOKENS)
    config = TrainConfig(model=model_config, lora=LoRAConfig(rank=8, alpha=32.0),
                         checkpoint=CheckpointConfig(save=str(tmp_path / "base")))
    model = build_emu(model_config, seed=3)
    init_chat_token_rows([model], tokenizer)
    save_full_checkpoint(model, config, 1)  # the base, vocabulary base + 6
    init_parameters(model, 0.02, 3, set(apply_lora(model, LoRASpec(8, 32.0))))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    adapters = dataclasses.replace(config, checkpoint=CheckpointConfig(save=str(tmp_path / "lora")))
    Checkpointer(adapters.checkpoint, adapters).save(1, [model], build_optimizer(model, OptimizerConfig()))

    hf_dir, peft_dir = str(tmp_path / "hf"), str(tmp_path / "peft")
    convert(["--to", "hf", "--input", str(tmp_path / "base"), "--output", hf_dir, "--tokenizer-model", tok_path])
    convert(["--to", "peft", "--input", str(tmp_path / "lora"), "--output", peft_dir])
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 8

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf, peft_dir).eval()
    tokens = torch.tensor([tokenizer.encode("what number comes after two?", bos=True)
                           + [tokenizer.special.user, tokenizer.special.assistant]])
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = adapted(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad(), adapted.disable_adapter():
        base_logits = adapted(tokens).logits
    assert (base_logits - ours).abs().max() > 1e-3  # the adapters change the output: the parity is theirs
