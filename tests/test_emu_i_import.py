"""Import of the released Emu-I (tiny sizes, written in the official layout during the test):
a 32006-style vocabulary (base + 6 rows) becomes an Emu-I checkpoint that instruct generation
uses; its unmerged PEFT LoRA (either PEFT naming) is folded in with logit parity against the
PEFT model it was saved from; a merged one passes through; a broken adapter is refused."""

import dataclasses
import os

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.convert.streams import DCPSource
from megatron_emu.generation import DecodingConfig, EmuGenerator
from megatron_emu.model.emu import build_emu
from tests.official_emu import emu_i_state, emu_v1_state

pytest.importorskip("peft")
TINY = get_preset("tiny")  # 4 added tokens: the import must see the 6 of Emu-I itself
EMU_I = dataclasses.replace(TINY, llm=dataclasses.replace(TINY.llm, num_special_tokens=6))


def llm_logits(model, tokens):  # (B, S) -> (B, S, V)
    llm = model.llm
    return llm.output(llm.norm(llm.forward_layers(llm.tok_embeddings(tokens))))


@pytest.mark.parametrize("old_peft, alpha, file", [(False, 16.0, "pt"), (True, 16.0, "pt"), (False, 4.0, "pt"),
                                                    (False, 16.0, "safetensors")],
                         ids=["peft-base_layer", "peft-0.3-names", "lora-alpha-4", "safetensors"])
def test_released_emu_i_imports_as_emu_i_with_logit_parity(tmp_path, old_peft, alpha, file):
    from tools.convert_checkpoint import main as convert_main

    model = build_emu(EMU_I, seed=3)
    state, source = emu_i_state(model, rank=8, alpha=alpha, old_peft=old_peft)  # alpha / r = 2 or 0.5
    assert len(state["decoder.lm.base_model.model.model.embed_tokens.weight"]) == 518  # 512 + 6
    path = tmp_path / f"Emu-instruct.{file}"
    if file == "pt":
        torch.save({"module": state}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    out = str(tmp_path / "emu-i")
    flags = [] if alpha == 16.0 else ["--lora-alpha", str(alpha)]  # 16: the release's, the default
    convert_main(["--from", "emu-v1", "--input", str(path), "--preset", "tiny", "--output", out, *flags])

    gen = EmuGenerator.load(out)
    assert gen.model == "emu-i" and gen.emu.config.llm.num_special_tokens == 6
    tokens = torch.randint(0, 518, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(tokens).logits
        diff = (llm_logits(gen.emu, tokens) - expected).abs().max().item()
        unmerged = (llm_logits(model, tokens) - expected).abs().max().item()
    assert diff < 1e-4 and unmerged > 1e-2, (diff, unmerged)  # the adapters matter and are merged
    ours = gen.emu.state_dict()
    for name, value in model.state_dict().items():  # everything outside q, k, v, o as released
        if not name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight")) or not name.startswith("llm."):
            assert torch.equal(ours[name], value), name
    assert isinstance(gen.chat("what comes after two?", config=DecodingConfig(max_new_tokens=3)), str)


def test_merged_emu_i_passes_through_unchanged(tmp_path):
    model = build_emu(EMU_I, seed=4)
    path = tmp_path / "emu-i-merged.pt"
    torch.save(emu_v1_state(model), path)  # plain decoder.lm.* names, 518 rows
    import_checkpoint([("emu-v1", str(path))], TINY, str(tmp_path / "out"), seed=0)
    source = DCPSource(str(tmp_path / "out"))
    assert source.record["config"]["model"]["llm"]["num_special_tokens"] == 6
    got = source.read(list(source.entries))
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s.pop(next(k for k in s if "lora_B" in k)), "has lora_A without lora_B"),
    (lambda s: s.pop(next(k for k in s if k.endswith("q_proj.base_layer.weight"))), "LoRA adapters of 1 weights the checkpoint lacks"),
])
def test_broken_adapters_are_refused_and_nothing_is_written(tmp_path, break_it, message):
    state, _ = emu_i_state(build_emu(EMU_I, seed=5))
    break_it(state)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=message) as error:
        import_checkpoint([("emu-v1", str(tmp_path / "broken.pt"))], TINY, str(tmp_path / "out"))
    assert "broken.pt" in str(error.value) and not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_an_emu_i_base_keeps_its_chat_rows_under_instruction_tuning(tmp_path):
    """[USER] / [ASSISTANT] rows are set from the words only when the base grows them: an
    imported Emu-I keeps its trained rows (here: --lora-merge without adapters = the base)."""
    from megatron_emu.arguments import parse_args
    from megatron_emu.training.train import pretrain

    model = build_emu(EMU_I, seed=6)
    torch.save(emu_v1_state(model), tmp_path / "emu-i.pt")
    import_checkpoint([("emu-v1", str(tmp_path / "emu-i.pt"))], TINY, str(tmp_path / "emu-i"), seed=0)
    pretrain(parse_args(["--lora-rank", "16", "--pretrained-checkpoint", str(tmp_path / "emu-i"), "--lora-merge",
                         "--save", str(tmp_path / "merged"), "--device", "cpu", "--num-workers", "0"]))
    source = DCPSource(str(tmp_path / "merged"))
    merged = source.read(list(source.entries))
    for name in ("llm.tok_embeddings.weight", "llm.output.weight"):
        assert torch.equal(merged[name], model.state_dict()[name]), name  # rows 516, 517 included


def test_lora_alpha_is_refused_where_nothing_reads_it(capsys):
    from tools.convert_checkpoint import main as convert_main

    with pytest.raises(SystemExit) as exit_:
        convert_main(["--to", "hf", "--input", "ckpt", "--output", "out", "--lora-alpha", "8"])
    assert exit_.value.code == 2 and "--lora-alpha is read only by --from emu-v1" in capsys.readouterr().err
