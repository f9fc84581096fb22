"""--from hf-llama never drops a config field that changes the function: rms_norm_eps, rope_theta
and RoPE scaling (linear, llama3) are carried into our checkpoint and back out into the
export's config.json (logit parity with transformers both ways); every other field our
LLaMA cannot compute is refused in one line naming the field and both values."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_emu.config import LLAMA_FUNCTION_FIELDS, get_preset
from megatron_emu.convert.export import export_hf
from megatron_emu.convert.hf_llama_config import llm_config_from_hf
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.convert.streams import DCPSource
from megatron_emu.data.tokenizer import build_tiny_tokenizer
from megatron_emu.generation.loading import load_for_inference
from megatron_emu.model.emu import build_emu

transformers = pytest.importorskip("transformers")
CONFIG = get_preset("tiny")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # short: on head_dim 32 every band of frequencies is hit

CASES = {  # name: (transformers LlamaConfig kwargs, what our LLaMAConfig must then hold)
    "llama-2 eps 1e-5": ({"rms_norm_eps": 1e-5}, {"norm_eps": 1e-5}),
    "rope_theta 500000": ({"rope_theta": 500000.0}, {"rope_theta": 500000.0}),
    "linear scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {"rope_type": "linear", "rope_factor": 4.0}),
    "llama3 scaling": ({"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "rope_scaling": LLAMA3},
                       {"rope_type": "llama3", "rope_factor": 8.0, "rope_original_max_positions": 64, "rope_theta": 500000.0}),
}


def llm_logits(model, tokens):  # (B, S) -> (B, S, V)
    llm = model.llm
    return llm.output(llm.norm(llm.forward_layers(llm.tok_embeddings(tokens))))


def save_hf_llama(path, **changes):
    """A random transformers LLaMA of the tiny preset's size (base vocabulary), saved."""
    llm = CONFIG.llm
    config = transformers.LlamaConfig(
        vocab_size=llm.base_vocab_size, hidden_size=llm.hidden, intermediate_size=llm.ffn_dim,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.heads,
        max_position_embeddings=llm.max_positions, tie_word_embeddings=False, **changes)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return model


def logit_diff(hf, ours) -> float:
    tokens = torch.randint(0, CONFIG.llm.base_vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 200 positions: past original_max_position_embeddings, where llama3 differs
        base = CONFIG.llm.base_vocab_size  # the source's rows (an export also has the added tokens')
        return (hf(tokens).logits[..., :base] - llm_logits(ours, tokens)[..., :base]).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_function_fields_are_carried_through_import_and_export(tmp_path, case):
    hf_kwargs, carried = CASES[case]
    hf = save_hf_llama(tmp_path / "llama", **hf_kwargs)
    import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, str(tmp_path / "ckpt"), seed=0)
    recorded = DCPSource(str(tmp_path / "ckpt")).record["config"]["model"]["llm"]
    assert {k: recorded[k] for k in carried} == carried
    ours = load_for_inference(str(tmp_path / "ckpt"))  # built from the checkpoint's recorded config
    assert logit_diff(hf, ours) < 1e-4
    silent = build_emu(CONFIG, seed=0)  # what an import that dropped the fields computed: the preset's
    source = DCPSource(str(tmp_path / "ckpt"))
    silent.load_state_dict(source.read(list(source.entries)))
    assert logit_diff(hf, silent) > 1e-3  # so the case is one a dropped field gets wrong

    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), build_tiny_tokenizer())
    written = json.load(open(tmp_path / "hf" / "config.json"))
    assert written["architectures"] == ["LlamaForCausalLM"]
    stated = llm_config_from_hf(str(tmp_path / "hf"), CONFIG.llm)  # what the export's config.json says
    assert {k: getattr(stated, k) for k in LLAMA_FUNCTION_FIELDS} == {k: recorded[k] for k in LLAMA_FUNCTION_FIELDS}
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert logit_diff(back, ours) < 1e-4


def test_legacy_config_layout_is_read(tmp_path):
    """transformers < 5 wrote rope_theta and rope_scaling ({"type": ...}) at top level."""
    hf = save_hf_llama(tmp_path / "llama", rope_theta=500000.0, rope_scaling=LLAMA3)
    file = tmp_path / "llama" / "config.json"
    config = json.load(open(file))
    del config["rope_parameters"]
    legacy = {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}
    config.update(rope_theta=500000.0, rope_scaling=legacy, torch_dtype="float16", pretraining_tp=1)
    file.write_text(json.dumps(config))
    llm = llm_config_from_hf(str(tmp_path / "llama"), CONFIG.llm)
    assert (llm.rope_type, llm.rope_theta, llm.rope_factor, llm.rope_original_max_positions) == ("llama3", 500000.0, 8.0, 64)
    import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, str(tmp_path / "ckpt"), seed=0)
    assert logit_diff(hf, load_for_inference(str(tmp_path / "ckpt"))) < 1e-4


LLAMA_2_13B = {  # meta-llama/Llama-2-13b-hf config.json, verbatim
    "_name_or_path": "meta-llama/Llama-2-13b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 13824, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 40,
    "num_hidden_layers": 40, "num_key_value_heads": 40, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}


def test_llama_2_13b_config_is_carried_into_emu_14b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_13B))
    preset = get_preset("emu-14b").llm
    llm = llm_config_from_hf(str(tmp_path), preset)
    assert llm.norm_eps == 1e-5 and preset.norm_eps == 1e-6
    assert (llm.rope_type, llm.rope_theta, llm.max_positions) == ("default", 10000.0, preset.max_positions)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act: checkpoint 'gelu' vs model 'silu'"),
    ({"attention_bias": True}, "attention_bias: checkpoint True vs model False"),
    ({"mlp_bias": True}, "mlp_bias: checkpoint True vs model False"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings: checkpoint True vs model False"),
    ({"model_type": "mistral"}, "model_type: checkpoint 'mistral' vs model 'llama'"),
    ({"attention_dropout": 0.1}, "attention_dropout: checkpoint 0.1 vs model 0.0"),
    ({"sliding_window": 4096}, "sliding_window: checkpoint 4096 is a field the converter does not know"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope type: checkpoint 'yarn' vs model one of 'default', 'linear', 'llama3'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type: checkpoint 'dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor: checkpoint 0.5 vs model 1.0"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope linear: checkpoint lacks factor"),
    ({"num_key_value_heads": 2}, "a different model size: num_key_value_heads: checkpoint 2 vs model 4"),
    ({"head_dim": 16}, "a different model size: head_dim: checkpoint 16 vs model 32"),
])
def test_a_field_our_llama_cannot_compute_is_refused(tmp_path, change, message):
    save_hf_llama(tmp_path / "llama")
    file = tmp_path / "llama" / "config.json"
    file.write_text(json.dumps({**json.load(open(file)), **change}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^{re.escape(str(file))}: .*{re.escape(message)}") as error:
        import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, str(out), seed=0)
    assert "\n" not in str(error.value)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_refusal_from_the_command_line_is_one_line_and_exit_code_1(tmp_path):
    save_hf_llama(tmp_path / "llama")
    file = tmp_path / "llama" / "config.json"
    file.write_text(json.dumps({**json.load(open(file)), "hidden_act": "gelu"}))
    run = subprocess.run([sys.executable, str(TOOL), "--from", "hf-llama", "--input", str(tmp_path / "llama"),
                          "--preset", "tiny", "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (f"error: {file}: unsupported by our LLaMA: "
                                                   "hidden_act: checkpoint 'gelu' vs model 'silu'")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_training_from_the_import_keeps_the_fields_in_its_checkpoint_and_export(tmp_path):
    from megatron_emu.arguments import parse_args
    from megatron_emu.training.train import pretrain

    save_hf_llama(tmp_path / "llama", rms_norm_eps=1e-5, rope_theta=500000.0)
    imported, save = str(tmp_path / "imported"), str(tmp_path / "trained")
    import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, imported, preset="tiny", seed=0)
    flags = ["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "80",
             "--num-workers", "0", "--train-iters", "1", "--log-interval", "100", "--device", "cpu",
             "--load", imported, "--finetune", "--save", save]
    with pytest.raises(ValueError, match=r"model\.llm\.norm_eps: checkpoint 1e-05 vs this run 1e-06; "
                                         r"model\.llm\.rope_theta: checkpoint 500000\.0 vs this run 10000\.0 "
                                         r"\(--use-checkpoint-args takes the checkpoint's\)"):
        pretrain(parse_args(flags))  # the preset's values would silently change the function
    pretrain(parse_args([*flags, "--use-checkpoint-args"]))
    trained = DCPSource(save).record["config"]["model"]["llm"]
    assert (trained["norm_eps"], trained["rope_theta"]) == (1e-5, 500000.0)
    export_hf(save, str(tmp_path / "hf"), build_tiny_tokenizer())
    stated = llm_config_from_hf(str(tmp_path / "hf"), CONFIG.llm)
    assert (stated.norm_eps, stated.rope_theta) == (1e-5, 500000.0)


def test_the_decoder_computes_the_frozen_emu_with_the_checkpoint_fields(tmp_path):
    from megatron_emu.generation.loading import load_emu

    hf = save_hf_llama(tmp_path / "llama", rms_norm_eps=1e-5, rope_scaling={"rope_type": "linear", "factor": 4.0})
    import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, str(tmp_path / "ckpt"), seed=0)
    emu = load_emu(get_preset("tiny"), str(tmp_path / "ckpt"))  # --emu-load of finetune_decoder.py
    assert (emu.config.llm.norm_eps, emu.config.llm.rope_type, emu.config.llm.rope_factor) == (1e-5, "linear", 4.0)
    assert logit_diff(hf, emu) < 1e-4


def test_emu_14b_has_the_parameter_count_of_the_official_release():
    """README's table: EVA-CLIP-g 1.011B, Causal Former 0.129B (not the "about 0.2B" once written),
    LLaMA-13B 13.016B, regression head 26M (counted on the meta device: nothing allocated)."""
    model = build_emu(get_preset("emu-14b"), device="meta")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    assert counts == {"visual": 1_011_143_296, "ln_visual": 2_816, "causal_former": 129_033_344,
                      "llm": 13_015_905_280, "regression_head": 26_214_400}
    assert sum(counts.values()) == 14_182_299_136


def test_our_export_reimported_keeps_the_fields_and_names_any_other_difference(tmp_path):
    import dataclasses

    save_hf_llama(tmp_path / "llama", rms_norm_eps=1e-5, rope_scaling={"rope_type": "linear", "factor": 4.0})
    import_checkpoint([("hf-llama", str(tmp_path / "llama"))], CONFIG, str(tmp_path / "ckpt"), seed=0)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), build_tiny_tokenizer())
    import_checkpoint([("hf-emu", str(tmp_path / "hf"))], CONFIG, str(tmp_path / "back"), seed=0)
    first, back = (DCPSource(str(tmp_path / d)).record["config"]["model"] for d in ("ckpt", "back"))
    assert back == first and back["llm"]["norm_eps"] == 1e-5 and back["llm"]["rope_type"] == "linear"

    other = dataclasses.replace(CONFIG, causal_former=dataclasses.replace(CONFIG.causal_former, norm_eps=1e-5))
    with pytest.raises(ValueError, match=r"hf: exported from another model config: causal_former\.norm_eps: "
                                         r"export 1e-06 vs preset 1e-05$"):
        import_checkpoint([("hf-emu", str(tmp_path / "hf"))], other, str(tmp_path / "refused"), seed=0)
    assert not (tmp_path / "refused").exists()


def test_a_checkpoint_older_than_the_rope_fields_still_loads_and_a_mismatch_is_named():
    import dataclasses

    from megatron_emu.config import ModelConfig
    from megatron_emu.training.checkpoint_files import check_model_config

    old = dataclasses.asdict(CONFIG)
    old["llm"] = {k: v for k, v in old["llm"].items() if not k.startswith("rope_") or k == "rope_theta"}
    assert ModelConfig.from_dict(old) == CONFIG
    check_model_config("old", old, dataclasses.asdict(CONFIG))  # no error: the fields it lacks are the defaults
    linear = dataclasses.replace(CONFIG, llm=dataclasses.replace(CONFIG.llm, rope_type="linear", rope_factor=2.0))
    with pytest.raises(ValueError, match=r"model\.llm\.rope_factor: checkpoint 1\.0 vs this run 2\.0; "
                                         r"model\.llm\.rope_type: checkpoint 'default' vs this run 'linear'"):
        check_model_config("old", old, dataclasses.asdict(linear))


@pytest.mark.parametrize("flags, message", [
    ([], "--use-checkpoint-args takes the model config from --load or --pretrained-checkpoint: give one"),
    (["--load", "EMPTY"], "EMPTY: no checkpoint there to take the model config from"),
])
def test_use_checkpoint_args_without_a_checkpoint_is_refused(tmp_path, flags, message):
    from megatron_emu.arguments import parse_args

    flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    with pytest.raises(ValueError, match=re.escape(message.replace("EMPTY", str(tmp_path)))):
        parse_args(["--use-checkpoint-args", *flags])
