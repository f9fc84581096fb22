"""Tensor- and pipeline-parallel generation (TP2, PP2, gloo, CPU): every rank decodes the tokens one process does."""

import numpy as np
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from megatron_emu.config import get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.generation.decoding import DecodingConfig, generate
from megatron_emu.generation.forward import CachedForward, shard_for_inference
from megatron_emu.generation.prompts import build_prompt
from megatron_emu.model.emu import build_emu
from tests.dist_utils import exit_probe, spawn

pytest.importorskip("transformers")
CONFIG = get_preset("tiny")


def _tp_worker(rank, world_size):
    tokenizer = EmuTokenizer(build_tiny_tokenizer())
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    prompts = [build_prompt(items, tokenizer, CONFIG) for items in (["a red circle"], [image, "the image shows"])]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    single, sharded = build_emu(CONFIG, seed=0).eval(), shard_for_inference(build_emu(CONFIG, seed=0).eval(), mesh)
    assert sharded.llm.layers["0"].attention.wq.weight.to_local().shape[0] == CONFIG.llm.hidden // world_size
    for config in (DecodingConfig(max_new_tokens=5, repetition_penalty=1.2), DecodingConfig(max_new_tokens=3, num_beams=2)):
        with torch.no_grad():
            expected = generate(CachedForward(single), prompts, config, {tokenizer.eos_id: "eos"})
            got = generate(CachedForward(sharded), prompts, config, {tokenizer.eos_id: "eos"})
        assert got == expected, (rank, config, got, expected)


def test_tp2_generates_the_tokens_of_one_process():
    spawn(2, _tp_worker)


def rank_errors(stderr: str) -> str:
    """What the ranks said before torchrun's summary (which only names the signal)."""
    said = [line for line in stderr.splitlines()
            if any(w in line for w in ("rror", "terminate", "abort", "Abort", "what()", "Exception", "Warning"))]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-1500:]


def test_tool_under_torchrun_tp2_and_pp2_prints_what_one_process_prints(tmp_path):
    import os
    import subprocess
    import sys

    from PIL import Image

    from megatron_emu.convert.imports import import_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import_checkpoint([], CONFIG, str(tmp_path / "ckpt"), seed=0)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = [os.path.join(root, "tools", "generate_text.py"), "--load", str(tmp_path / "ckpt"),
            "--image", str(tmp_path / "a.png"), "--prompt", "a red", "--task", "prompt", "--max-new-tokens", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, str(exit_probe(tmp_path))]), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
                          "--tensor-model-parallel-size", "2"], capture_output=True, text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, rank_errors(two.stderr)
    assert two.stdout == one.stdout and one.stdout.startswith("a red\t")
    assert two.stderr.count("process group at exit: ended") == 2, rank_errors(two.stderr)  # cli.end_process_group
    stages = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
                             "--pipeline-model-parallel-size", "2"], capture_output=True, text=True, env=env)
    assert stages.returncode == 0 and stages.stdout == one.stdout, rank_errors(stages.stderr)
    bad = subprocess.run([sys.executable, *args, "--tensor-model-parallel-size", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "world size 1 is not divisible by --tensor-model-parallel-size 2" in bad.stderr
