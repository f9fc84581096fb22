"""README "After command 1": its commands run verbatim on the outputs of a short command 1
(about 60 s on 2 idle cores, most of it the decoder's 60 steps: in the default suite, so CI
runs the README as a new user would), and each still parses."""

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Command 1 with fewer iterations: what the walkthrough needs is its checkpoint, where the bare run keeps it.
SHORT_COMMAND_1 = "python pretrain_emu.py --train-iters 4 --save runs/tiny/checkpoints"


def walkthrough_commands() -> list[str]:
    """The command lines of the section's bash block, as written (comments left out)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## After command 1\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_entry_point(script: str, argv: list[str]) -> None:
    """The flags through the script's own parser (and, for the entry points, their checks)."""
    if script == "pretrain_emu.py":
        from megatron_emu.arguments import parse_args

        parse_args(argv)
    elif script == "finetune_decoder.py":
        from megatron_emu.decoder.arguments import parse_decoder_args

        parse_decoder_args(argv)
    else:
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        assert hasattr(module, "build_parser"), f"{script}: give it a build_parser() so this test can check its flags"
        module.build_parser().parse_args(argv)


def test_every_walkthrough_command_parses():
    commands = walkthrough_commands()
    assert len(commands) >= 7, commands  # export, two reloads, decoder, image, a picture, two text runs
    for line in commands:
        program, *argv = shlex.split(line)
        assert program == "python", line
        if argv[0] == "-c":
            compile(argv[1], line, "exec")
        else:
            parse_entry_point(argv[0], argv[1:])


def test_walkthrough_runs_verbatim_after_a_short_command_1(tmp_path):
    for name in ("tools", "pretrain_emu.py", "finetune_decoder.py"):  # the repository root, but runs/ in tmp_path
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    outputs = []
    for line in [SHORT_COMMAND_1, *walkthrough_commands()]:
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"{line}\n{run.stderr[-3000:]}"
        outputs.append(run.stdout)
    assert outputs[0].splitlines()[-1].startswith("checkpoint: runs/tiny/checkpoints/iter_0000004 ")
    assert (tmp_path / "runs/tiny/hf/config.json").is_file() and (tmp_path / "runs/tiny/hf/visual").is_dir()
    assert outputs[3].strip().endswith("parameters") and (tmp_path / "runs/decoder_tiny/decoder/unet").is_dir()
    assert Image.open(tmp_path / "runs/generated/image_000.png").size == (64, 64)
    assert outputs[-2].startswith("<img:runs/red_circle.png>\t")  # the query, a tab, the text
    assert outputs[-1].startswith("runs/red_circle.png\twhat colour is the shape?\t")
