"""Generation loads every form we write (our DCP checkpoint, an HF export, a state-dict file
with Emu-I's 6-token vocabulary) and tools/generate_text.py runs, or says in one line why not."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.data.tokenizer import build_tiny_tokenizer
from megatron_emu.generation import DecodingConfig, EmuGenerator
from megatron_emu.model.emu import build_emu

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = get_preset("tiny")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import generate_text  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "ckpt"
    import_checkpoint([], CONFIG, str(root), seed=0)  # a random tiny Emu, saved as our DCP checkpoint
    return str(root)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


GREEDY = DecodingConfig(max_new_tokens=4)


def test_checkpoint_and_hf_export_generate_the_same(checkpoint, image_path, tmp_path):
    from pathlib import Path

    from megatron_emu.convert.export import export_hf

    prompts = [[Path(image_path), "the image shows"], ["a red"]]
    ours = EmuGenerator.load(checkpoint).generate(prompts, GREEDY)
    export_hf(checkpoint, str(tmp_path / "hf"), build_tiny_tokenizer())
    hf = EmuGenerator.load(str(tmp_path / "hf")).generate(prompts, GREEDY)
    assert [r.tokens for r in ours] == [r.tokens for r in hf] and all(len(r.tokens) == 4 for r in ours)


def test_a_six_token_state_file_is_emu_i_and_chats(tmp_path, image_path):
    from pathlib import Path

    config = dataclasses.replace(CONFIG, llm=dataclasses.replace(CONFIG.llm, num_special_tokens=6))
    emu = build_emu(config, seed=0)
    path = str(tmp_path / "emu-i.safetensors")
    save_file(emu.state_dict(), path)
    gen = EmuGenerator.load(path)
    assert gen.model == "emu-i" and gen.tokenizer.vocab_size == 518
    assert gen.stop_ids == {gen.tokenizer.eos_id: "eos", config.special_tokens.user: "user"}  # [USER]: next turn
    result = gen.generate([gen_chat(gen.tokenizer, Path(image_path))], GREEDY)[0]
    assert len(result.tokens) == 4 or result.stop in ("eos", "user")
    assert isinstance(gen.chat("which colour?", visual=Path(image_path), config=GREEDY), str)
    with pytest.raises(ValueError, match="Emu-I's \\[USER\\]/\\[ASSISTANT\\] template"):
        EmuGenerator(build_emu(CONFIG, seed=0), gen.tokenizer.__class__(build_tiny_tokenizer())).chat("hi")


def gen_chat(tokenizer, image):
    from megatron_emu.generation.prompts import chat_prompt

    return chat_prompt(tokenizer, [("what is it?", "a square")], "which colour?", visual=image)


def test_tool_captions_images_with_a_progress_bar(checkpoint, image_path, capfd):
    lines = generate_text.main(["--load", checkpoint, "--image", image_path, "--image", image_path,
                                "--max-new-tokens", "3", "--batch-size", "1"])
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(image_path + "\t")
    assert "prompts: 100%" in capfd.readouterr().err
    vqa = generate_text.main(["--load", checkpoint, "--task", "vqa", "--image", image_path, "--question", "what?",
                              "--max-new-tokens", "2", "--num-beams", "2"])
    assert vqa[0].startswith(f"{image_path}\twhat?\t")


@pytest.mark.parametrize("argv, message", [
    (["--image", "x.png"], "--load CHECKPOINT is required"),
    (["--load", "/nonexistent/ckpt", "--image", "x.png"], "/nonexistent/ckpt: no such checkpoint"),
    (["--load", "CKPT"], "nothing to do"),
    (["--load", "CKPT", "--task", "vqa", "--image", "IMG"], "one --question per image"),
    (["--load", "CKPT", "--prompt", "hi", "--temperature", "0", "--sample"], "--temperature must be > 0"),
])
def test_tool_refuses_bad_input_in_one_line(checkpoint, image_path, argv, message, capsys):
    argv = [checkpoint if a == "CKPT" else image_path if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        generate_text.main(argv)
    assert message in str(exit_.value.code)


def test_tool_run_bare_prints_usage_and_an_example_not_a_traceback():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "usage: generate_text.py" in done.stderr and "example: python tools/generate_text.py --load" in done.stderr


@pytest.fixture(scope="module")
def emu_i_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-i") / "ckpt"
    config = dataclasses.replace(CONFIG, llm=dataclasses.replace(CONFIG.llm, num_special_tokens=6))
    import_checkpoint([], config, str(root), seed=0)  # a random tiny Emu-I
    return str(root)


def test_tool_chats_without_an_image(emu_i_checkpoint):
    """Language-only chat: one conversation per --question, no system message (Appendix B.2)."""
    from megatron_emu.generation.prompts import build_prompt, chat_prompt

    lines = generate_text.main(["--load", emu_i_checkpoint, "--task", "chat", "--question", "what comes after two?",
                                "--question", "and after three?", "--turn", "hi", "hello.", "--max-new-tokens", "3"])
    assert [line.split("\t")[0] for line in lines] == ["what comes after two?", "and after three?"]
    gen = EmuGenerator.load(emu_i_checkpoint)
    expected = gen.generate([chat_prompt(gen.tokenizer, [("hi", "hello.")], "what comes after two?")], DecodingConfig(3))[0]
    assert lines[0] == f"what comes after two?\t{expected.text}"
    prompt = build_prompt(chat_prompt(gen.tokenizer, [], "what comes after two?"), gen.tokenizer, CONFIG).tokens
    assert prompt[1] == gen.tokenizer.special.user and CONFIG.special_tokens.img_start not in prompt


@pytest.mark.parametrize("argv, message", [
    (["--task", "chat"], "nothing to do"),
    (["--task", "caption", "--image", "IMG", "--turn", "q", "a"], "--turn gives a chat's earlier turns"),
    (["--task", "chat", "--image", "IMG", "--image", "IMG", "--question", "a", "--question", "b", "--question", "c"],
     "one --question per image / video"),
    (["--task", "chat", "--question", "hi", "--pretrained-checkpoint", "CKPT"], "is a full checkpoint, not adapters"),
])
def test_tool_refuses_bad_chat_flags_in_one_line(emu_i_checkpoint, image_path, argv, message):
    argv = [emu_i_checkpoint if a == "CKPT" else image_path if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        generate_text.main(["--load", emu_i_checkpoint, *argv])
    assert message in str(exit_.value.code)
