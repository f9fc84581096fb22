"""Generation loads an instruction-tuning checkpoint (adapters only) on its base directly: the
same weights and tokens as the --lora-merge checkpoint; the base is the recorded one or
--pretrained-checkpoint, and a base whose fingerprint differs, or a recorded base that is
gone, is refused in one line."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_emu.arguments import parse_args
from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.convert.streams import DCPSource
from megatron_emu.generation import DecodingConfig, EmuGenerator
from megatron_emu.generation.prompts import chat_prompt
from megatron_emu.training.checkpoint_files import iteration_dir
from megatron_emu.training.train import pretrain
from tests.instruct_fixtures import write_counting_alpaca
from tools.generate_text import main as generate_main
from tools.preprocess_data import main as preprocess_main

COMMON = ["--num-workers", "0", "--device", "cpu", "--log-interval", "100", "--seq-length", "64",
          "--micro-batch-size", "2", "--global-batch-size", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base, adapters trained on it (2 iterations) and their --lora-merge."""
    root = tmp_path_factory.mktemp("adapters")
    data = str(root / "count")
    preprocess_main(["--input-type", "alpaca", "--input", write_counting_alpaca(str(root / "count_alpaca.json")),
                     "--output-prefix", data, "--no-progress"])
    base, adapters, merged = (str(root / n) for n in ("base", "lora", "merged"))
    import_checkpoint([], get_preset("tiny"), base, seed=0)  # a (random) pretrained Emu: 4 added tokens
    lora = ["--lora-rank", "16", "--data-path", "1", data, "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--train-iters", "2", "--pretrained-checkpoint", base, *COMMON]
    pretrain(parse_args(lora + ["--save", adapters]))
    pretrain(parse_args(lora + ["--load", adapters, "--lora-merge", "--save", merged]))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "x.png")
    return base, adapters, merged, str(root / "x.png")


def test_adapters_on_their_base_generate_the_merged_tokens(runs):
    base, adapters, merged, image = runs
    on_base, full = EmuGenerator.load(adapters), EmuGenerator.load(merged)
    assert on_base.model == "emu-i"
    ours, theirs = on_base.emu.state_dict(), full.emu.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical
    name = "llm.layers.0.attention.wq.weight"  # the adapters were trained: the merge changed the base
    assert not torch.equal(theirs[name], DCPSource(base).read([name])[name])
    prompts = [chat_prompt(full.tokenizer, [], "what number comes after two?"),
               chat_prompt(full.tokenizer, [("hi", "hello.")], "what is it?", Path(image))]
    config = DecodingConfig(max_new_tokens=6)
    expected = full.generate(prompts, config)
    assert [r.tokens for r in on_base.generate(prompts, config)] == [r.tokens for r in expected]
    lines = generate_main(["--load", adapters, "--task", "chat", "--question", "what number comes after two?",
                           "--max-new-tokens", "6"])
    assert lines == [f"what number comes after two?\t{expected[0].text}"]


def test_another_base_or_a_missing_base_is_refused_in_one_line(runs, tmp_path):
    base, adapters, _, _ = runs
    other = str(tmp_path / "other")
    import_checkpoint([], get_preset("tiny"), other, seed=7)
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--load", adapters, "--pretrained-checkpoint", other, "--task", "chat", "--question", "hi"])
    assert "refusing --pretrained-checkpoint" in str(exit_.value.code) and other in str(exit_.value.code)

    moved = base + ".moved"
    os.rename(base, moved)  # the recorded base is gone; the same base elsewhere is accepted
    try:
        with pytest.raises(ValueError, match=f"its base {base}/iter_0000000 is gone: give --pretrained-checkpoint"):
            EmuGenerator.load(adapters)
        assert EmuGenerator.load(adapters, base=moved).model == "emu-i"
    finally:
        os.rename(moved, base)
    assert os.path.isdir(iteration_dir(base, 0))


def _adapters_worker(rank, world_size, adapters, merged, tp, pp):
    import torch.distributed.checkpoint as dcp

    from megatron_emu.generation.inference import InferenceConfig, build_inference

    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    loaded, real_load = [], dcp.load
    dcp.load = lambda state, **kw: loaded.extend(state["model"]) or real_load(state, **kw)  # the base's reads
    try:
        on_base = build_inference(InferenceConfig(adapters, **layout))
    finally:
        dcp.load = real_load
    full = build_inference(InferenceConfig(merged, **layout))
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    ours, theirs = on_base.emu.state_dict(), full.emu.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:  # bit-identical, shard by shard
        assert torch.equal(whole(ours[name]), whole(theirs[name])), (rank, name)
    assert sorted(loaded) == sorted(ours)  # the base: this part's tensors only
    wq = ours.get("llm.layers.0.attention.wq.weight")
    if tp > 1:  # read into shards made on the meta device
        assert wq.to_local().shape[0] == wq.shape[0] // tp
    if pp > 1:
        assert (wq is not None) == (on_base.pmesh.pp_rank == 0) and ("llm.output.weight" in ours) == (on_base.pmesh.pp_rank == 1)


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)], ids=["pp2", "tp2"])
def test_adapters_on_their_base_per_part(runs, tp, pp):
    """PP2 / TP2: each rank reads its part of the base (its stage; its shards) and of the
    adapters and merges them: the part of the --lora-merge checkpoint, bit for bit."""
    from tests.dist_utils import spawn

    _, adapters, merged, _ = runs
    spawn(2, _adapters_worker, adapters, merged, tp, pp)
