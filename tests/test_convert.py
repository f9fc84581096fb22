"""Conversion: logit parity with transformers LlamaForCausalLM (export and import), a
bit-identical round trip, the Emu v1 layout, and bad inputs (EVA-CLIP: test_convert_eva.py)."""

import json
import os

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.convert.export import export_hf
from megatron_emu.convert.hf_emu import load_emu_from_hf
from megatron_emu.convert.imports import fresh_parameters, import_checkpoint
from megatron_emu.convert.keys import ours_to_eva
from megatron_emu.convert.streams import DCPSource
from megatron_emu.data.tokenizer import build_tiny_tokenizer
from megatron_emu.model.emu import build_emu
from tests.official_emu import emu_v1_state

transformers = pytest.importorskip("transformers")
CONFIG = get_preset("tiny")


def llm_logits(model, tokens):  # (B, S) -> (B, S, V)
    llm = model.llm
    return llm.output(llm.norm(llm.forward_layers(llm.tok_embeddings(tokens))))


def read_model(checkpoint: str) -> dict[str, torch.Tensor]:
    source = DCPSource(checkpoint)
    return source.read(list(source.entries))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A random tiny Emu saved as our checkpoint (import with no inputs = fresh init)."""
    root = tmp_path_factory.mktemp("ours") / "ckpt"
    import_checkpoint([], CONFIG, str(root), seed=0)
    model = build_emu(CONFIG, seed=1)
    model.load_state_dict(read_model(str(root)))
    return str(root), model


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "emu-hf"
    export_hf(ours[0], str(out), build_tiny_tokenizer(), max_shard_bytes=400_000)  # several shards
    return str(out)


def test_export_loads_in_transformers_with_logit_parity(ours, exported):
    _, model = ours
    assert os.path.exists(os.path.join(exported, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(exported) if f.endswith(".safetensors")]) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokens = torch.randint(0, CONFIG.llm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - llm_logits(model, tokens)).abs().max().item()
    assert diff < 1e-4


def test_exported_tokenizer_has_the_added_tokens_at_the_spec_ids(exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", "[IMG]", "[/IMG]", "<image>"])
    assert ids == [CONFIG.special_tokens.pad, CONFIG.special_tokens.img_start, CONFIG.special_tokens.img_end, CONFIG.special_tokens.image]
    from megatron_emu.data.tokenizer import EmuTokenizer

    text = "a red square on the left of a blue circle"
    assert tokenizer(text).input_ids == EmuTokenizer(build_tiny_tokenizer()).encode(text, bos=True)


def test_round_trip_ours_hf_ours_is_bit_identical(ours, exported, tmp_path):
    back = tmp_path / "back"
    import_checkpoint([("hf-emu", exported)], CONFIG, str(back), seed=99, max_shard_bytes=300_000)
    original, restored = ours[0], str(back)
    files = [n for n in os.listdir(os.path.join(restored, "iter_0000000")) if n.endswith(".distcp")]
    assert len(files) > 3  # streamed: written in groups of ~300 kB, never the whole model at once
    a, b = read_model(original), read_model(restored)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    reloaded = load_emu_from_hf(exported)  # the inference path: whole Emu from the export
    assert all(torch.equal(p, a[n]) for n, p in reloaded.named_parameters())


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers LLaMA with the base vocabulary (as released), saved as safetensors."""
    llm = CONFIG.llm
    config = transformers.LlamaConfig(
        vocab_size=llm.base_vocab_size, hidden_size=llm.hidden, intermediate_size=llm.ffn_dim,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.heads,
        max_position_embeddings=llm.max_positions, rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama") / "llama"
    model.save_pretrained(str(path), max_shard_size="300KB")
    return str(path), model


def test_import_hf_llama_logit_parity_and_mean_initialised_rows(hf_llama, tmp_path):
    path, hf = hf_llama
    out = tmp_path / "imported"
    import_checkpoint([("hf-llama", path)], CONFIG, str(out), seed=0)
    model = build_emu(CONFIG, seed=5)
    model.load_state_dict(read_model(str(out)))
    tokens = torch.randint(0, CONFIG.llm.base_vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = llm_logits(model, tokens)
        diff = (hf(tokens).logits - ours_logits[..., : CONFIG.llm.base_vocab_size]).abs().max().item()
    assert diff < 1e-4
    old = hf.model.embed_tokens.weight
    new_rows = model.llm.tok_embeddings.weight[CONFIG.llm.base_vocab_size:]
    assert torch.allclose(new_rows, old.mean(0).expand_as(new_rows))
    assert torch.allclose(model.llm.output.weight[CONFIG.llm.base_vocab_size:], hf.lm_head.weight.mean(0).expand_as(new_rows))


def test_import_emu_v1_and_eva_clip_layouts(tmp_path):
    model = build_emu(CONFIG, seed=3)
    v1 = tmp_path / "emu-v1.pt"
    torch.save({"module": emu_v1_state(model)}, v1)
    import_checkpoint([("emu-v1", str(v1))], CONFIG, str(tmp_path / "from-v1"), seed=0)
    got = read_model(str(tmp_path / "from-v1"))
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())

    eva = {**ours_to_eva(model.state_dict()), "norm.weight": torch.ones(1), "head.weight": torch.ones(1)}  # unused by Emu
    from safetensors.torch import save_file

    save_file(eva, str(tmp_path / "eva.safetensors"))
    import_checkpoint([("eva-clip", str(tmp_path / "eva.safetensors"))], CONFIG, str(tmp_path / "from-eva"), seed=11)
    got = read_model(str(tmp_path / "from-eva"))
    others = [k for k in got if not k.startswith("visual.")]
    fresh = {k: v for family in fresh_parameters(build_emu(CONFIG, device="meta"), others, seed=11) for k, v in family.items()}
    for k, v in model.state_dict().items():  # visual from EVA, the rest freshly initialised
        assert torch.equal(got[k], v if k.startswith("visual.") else fresh[k]), k
    assert torch.equal(got["llm.norm.weight"], torch.ones(CONFIG.llm.hidden))  # Emu's init, not zeros or garbage
    assert abs(got["llm.layers.0.attention.wq.weight"].std().item() - CONFIG.init_std) < 0.1 * CONFIG.init_std


def _break_config(path, tmp_path, **changes):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(path):
        os.symlink(os.path.join(path, name), broken / name)
    config = json.load(open(os.path.join(path, "config.json")))
    config.update(changes)
    os.remove(broken / "config.json")
    json.dump(config, open(broken / "config.json", "w"))
    return str(broken)


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated"),
    ("other size", r"a different model size: hidden_size: checkpoint 64 vs model 128"),
    ("vocab", r"vocab_size: checkpoint 600 vs model 512"),
])
def test_bad_input_is_refused_and_nothing_is_written(hf_llama, tmp_path, case, message):
    path, _ = hf_llama
    if case == "truncated":
        broken = tmp_path / "truncated"
        broken.mkdir()
        shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        for name in os.listdir(path):
            data = open(os.path.join(path, name), "rb").read()
            if name == shards[-1]:  # a copy cut short
                data = data[: len(data) // 2]
            open(broken / name, "wb").write(data)
        path = str(broken)
    elif case == "other size":
        path = _break_config(path, tmp_path, hidden_size=64)
    else:
        path = _break_config(path, tmp_path, vocab_size=600)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        import_checkpoint([("hf-llama", path)], CONFIG, str(out), seed=0)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]  # no partial temp dir either


def test_export_refuses_a_tokenizer_of_another_vocab(ours, tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"word{i} other{i * 7} thing{i % 13}" for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=90, minloglevel=2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="vocab mismatch: 90 pieces, the model expects 512"):
        export_hf(ours[0], str(out), str(tmp_path / "sp.model"))
    assert not out.exists()
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model: not a sentencepiece model"):
        export_hf(ours[0], str(out), str(garbage))
    assert not out.exists()


def _mapped_file(address: int) -> str:
    """The file mapped at `address` in this process ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def test_direct_read_equals_dcp_load_and_views_stored_tensors(ours):
    source = DCPSource(ours[0])
    names = list(source.entries)
    direct, loaded = source.read(names), source.read(names, direct=False)
    assert all(torch.equal(direct[n], loaded[n]) and direct[n].dtype == loaded[n].dtype for n in names)
    if os.path.exists("/proc/self/maps"):  # stored whole (one piece per tensor): views of the .distcp files
        assert all(_mapped_file(direct[n].data_ptr()).endswith(".distcp") for n in names)
        assert not any(_mapped_file(loaded[n].data_ptr()).endswith(".distcp") for n in names)


def test_export_and_import_with_a_dtype_cast_read_the_spans_they_change(ours, exported, tmp_path):
    """With a cast the tensors are read (not copied as spans) and converted on both sides."""
    from megatron_emu.convert.hf_emu import hf_emu_tensors

    out = tmp_path / "bf16"
    export_hf(ours[0], str(out), build_tiny_tokenizer(), max_shard_bytes=400_000, dtype=torch.bfloat16)
    want = {n: p.detach() for n, p in ours[1].named_parameters()}
    got = dict(hf_emu_tensors(str(out)))
    assert got.keys() == want.keys()
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n].bfloat16()) for n in want)
    back = tmp_path / "back"
    import_checkpoint([("hf-emu", exported)], CONFIG, str(back), dtype=torch.bfloat16)
    loaded = read_model(str(back))
    assert all(loaded[n].dtype == torch.bfloat16 and torch.equal(loaded[n], want[n].bfloat16()) for n in want)


def test_a_full_disk_is_one_line_and_leaves_no_output(ours, tmp_path, monkeypatch):
    """The disk fills after the export's first write: one `error:` line naming the output, no
    traceback, and neither the output nor its temporary directory is left behind."""
    import errno
    import subprocess
    import sys

    script = (
        "import errno, os, runpy, sys\n"
        "real, calls = os.pwrite, [0]\n"
        "def pwrite(fd, data, offset):\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 1:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return real(fd, data, offset)\n"
        "os.pwrite = pwrite\n"
        "sys.argv = ['convert_checkpoint.py'] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0] if os.path.isfile(sys.argv[0]) else 'tools/convert_checkpoint.py', run_name='__main__')\n"
    )
    out = tmp_path / "hf"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script, "--to", "hf", "--input", ours[0], "--output", str(out)],
                         capture_output=True, text=True, cwd=root)
    errors = [line.strip("\r ") for line in run.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert errors == [f"error: {out}: {os.strerror(errno.ENOSPC)}; nothing was written (the output appears whole "
                      "or not at all): free space, then run the same command"]
    assert os.listdir(tmp_path) == []


def test_a_killed_export_leaves_no_output_and_the_next_one_sweeps_its_partial(ours, tmp_path):
    """SIGKILL mid-export (no cleanup runs): the output stays absent (written whole or not at all),
    and the next export of the same output removes the dead writer's partial directory
    (a 14B export's would keep ~28 GB); a live writer's partial is left alone."""
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "hf"
    script = ("import os, signal, sys, runpy\n"
              "import megatron_emu.direct_io as d\n"
              "real = d.DirectFile.write\n"
              "def write(self, data):\n"
              "    real(self, data)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)  # killed after the first write\n"
              "d.DirectFile.write = write\n"
              "sys.argv = ['tools/convert_checkpoint.py'] + sys.argv[1:]\n"
              "runpy.run_path('tools/convert_checkpoint.py', run_name='__main__')\n")
    killed = subprocess.run([sys.executable, "-c", script, "--to", "hf", "--input", ours[0], "--output", str(out)],
                            cwd=root, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partials = [p for p in os.listdir(tmp_path) if p.startswith(".hf.partial-")]
    assert len(partials) == 1 and not out.exists()
    live = tmp_path / f".hf.partial-{os.getppid()}"  # pytest's parent process: alive, another writer
    live.mkdir()
    export_hf(ours[0], str(out), build_tiny_tokenizer())
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", live.name])
