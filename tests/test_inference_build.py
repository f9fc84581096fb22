"""The one inference build (generation/inference.py build_inference): every entry point that
runs a frozen Emu goes through it; TP2 and PP2 parts (gloo, CPU) give what one process gives:
logits, greedy / beam / sampled tokens, candidate likelihoods and RICES features."""

import os
import sys

import numpy as np
import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.generation import inference as inference_module
from megatron_emu.generation.decoding import DecodingConfig, generate
from megatron_emu.generation.forward import CachedForward
from megatron_emu.generation.inference import InferenceConfig, build_inference
from megatron_emu.generation.loading import load_for_inference
from megatron_emu.generation.prompts import build_prompt
from tests import eval_fixtures as fx
from tests.dist_utils import spawn

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
CONFIG = get_preset("tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer") / "ckpt"
    import_checkpoint([], CONFIG, str(root), seed=0)
    return str(root)


class Built(Exception):
    """The spy's stop: the entry point reached build_inference."""


def test_every_inference_entry_point_builds_through_build_inference(checkpoint, tmp_path, monkeypatch):
    from megatron_emu.decoder import train as decoder_train
    from megatron_emu.decoder.arguments import DecoderConfig

    sys.path.insert(0, TOOLS)
    import evaluate
    import generate_image
    import generate_text

    seen = []

    def spy(config):
        seen.append(config)
        raise Built

    monkeypatch.setattr(inference_module, "build_inference", spy)  # the tools import it when they run
    monkeypatch.setattr(decoder_train, "build_inference", spy)
    vqa = fx.vqa_pair(str(tmp_path), "val2014", 2)
    calls = {
        "generate_text": lambda: generate_text.main(["--load", checkpoint, "--prompt", "a", "--pipeline-model-parallel-size", "2"]),
        "evaluate": lambda: evaluate.main(["--task", "vqav2", "--checkpoint", checkpoint, "--tensor-model-parallel-size",
                                           "2", "--output-dir", str(tmp_path / "eval")] + fx.flags(vqa)),
        "generate_image": lambda: generate_image.main(["--emu-load", checkpoint, "--decoder", str(tmp_path),
                                                       "--prompt", "a"]),
        "decoder": lambda: decoder_train.finetune(DecoderConfig(preset="tiny", emu_load=checkpoint)),
    }
    for name, call in calls.items():
        with pytest.raises(Built):
            call()
    assert [c.load for c in seen] == [checkpoint] * 4
    assert (seen[0].pipeline_model_parallel_size, seen[1].tensor_model_parallel_size) == (2, 2)
    assert seen[2].model == CONFIG and seen[3].model == CONFIG  # --emu-load: the preset's Emu (frozen.py)
    # ... and none of them builds a mesh or reads the weights itself.
    for path in ("tools/generate_text.py", "tools/evaluate.py", "tools/generate_image.py", "megatron_emu/decoder/train.py"):
        source = open(os.path.join(ROOT, path)).read()
        for private in ("init_device_mesh", "load_for_inference", "load_emu(", "EmuGenerator.load("):
            assert private not in source, (path, private)


def prompts_for(tokenizer):
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    items = (["a red circle"], [image, "the image shows"], ["once", image, "then"])
    return [build_prompt(i, tokenizer, CONFIG) for i in items]


def _tp_worker(rank, world_size, path):
    from torch.distributed.tensor import DTensor

    from megatron_emu.generation import loading

    filled, real_copy = [], loading.copy_into
    loading.copy_into = lambda target, whole: filled.append(isinstance(target, DTensor)) or real_copy(target, whole)
    try:
        run = build_inference(InferenceConfig(path, tensor_model_parallel_size=2))
    finally:
        loading.copy_into = real_copy
    assert any(filled)  # read into shards made on the meta device: no full-size copy of a sharded weight
    single = load_for_inference(path)
    tokenizer = EmuTokenizer(build_tiny_tokenizer())
    assert (run.dims.tp, run.dims.pp, run.dims.dp) == (2, 1, 1)
    wq = run.emu.llm.layers["0"].attention.wq.weight
    assert wq.to_local().shape[0] == CONFIG.llm.hidden // 2 and not wq.requires_grad
    assert not any(p.requires_grad for p in run.emu.parameters()) and not run.emu.training
    prompts = prompts_for(tokenizer)
    with torch.no_grad():
        sharded, whole = CachedForward(run.emu), CachedForward(single)
        torch.testing.assert_close(sharded.start(prompts), whole.start(prompts), rtol=1e-5, atol=1e-5)
        next_tokens = torch.tensor([5, 6, 7])
        torch.testing.assert_close(sharded.step(next_tokens), whole.step(next_tokens), rtol=1e-5, atol=1e-5)
    # bf16: the shards are allocated in bf16 on the meta device's plan, then read into.
    half, cast = build_inference(InferenceConfig(path, tensor_model_parallel_size=2, bf16=True)), single.to(torch.bfloat16)
    for name, tensor in half.emu.state_dict().items():
        assert torch.equal(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor, cast.state_dict()[name]), name


def test_tp2_frozen_build_gives_the_logits_of_one_process(checkpoint):
    spawn(2, _tp_worker, checkpoint)


def built_reading(source_class, config: InferenceConfig):
    """(build_inference(config), the names it read through source_class.read)."""
    read, real_read = [], source_class.read
    source_class.read = lambda self, names, **kw: read.extend(names) or real_read(self, names, **kw)
    try:
        return build_inference(config), read
    finally:
        source_class.read = real_read


def _pp_worker(rank, world_size, path, state_files, tp):
    from megatron_emu.convert.streams import DCPSource
    from megatron_emu.evaluation.likelihood import continuation_logprobs
    from megatron_emu.generation.weight_sources import SpanSource

    run, read = built_reading(DCPSource, InferenceConfig(path, tensor_model_parallel_size=tp,
                                                         pipeline_model_parallel_size=2))
    assert sorted(read) == sorted(run.emu.state_dict())  # this stage's tensors only, not the whole model
    single = load_for_inference(path)
    tokenizer = EmuTokenizer(build_tiny_tokenizer())
    stage = run.pmesh.pp_rank
    assert run.dims.stage_layers == (2, 2) and set(run.emu.llm.layers) == ({"0", "1"} if stage == 0 else {"2", "3"})
    assert (run.emu.visual is not None, run.emu.regression_head is not None) == (stage == 0, stage == 1)
    stop = {tokenizer.eos_id: "eos"}
    prompts = prompts_for(tokenizer)
    for config in (DecodingConfig(max_new_tokens=6), DecodingConfig(max_new_tokens=4, repetition_penalty=1.3),
                   DecodingConfig(max_new_tokens=4, do_sample=True, temperature=1.5, seed=3),
                   DecodingConfig(max_new_tokens=3, num_beams=2)):
        expected = generate(CachedForward(single), prompts, config, stop)
        got = generate(CachedForward(run.emu, run.links), prompts, config, stop)
        assert got == expected, (rank, config, got, expected)
    options = [[7, 8, 9], [10], [11, 12, 13, 14]]  # VisDial-style candidates of unequal length
    expected = continuation_logprobs(CachedForward(single), prompts[1], options, chunk=2)
    got = continuation_logprobs(CachedForward(run.emu, run.links), prompts[1], options, chunk=2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    config = DecodingConfig(max_new_tokens=4)
    for state_file in state_files:
        from_file, read = built_reading(SpanSource, InferenceConfig(state_file, tensor_model_parallel_size=tp,
                                                                    pipeline_model_parallel_size=2))
        assert sorted(read) == sorted(from_file.emu.state_dict()) == sorted(run.emu.state_dict())  # its stage only
        assert generate(CachedForward(from_file.emu, from_file.links), prompts, config, stop) == \
            generate(CachedForward(single), prompts, config, stop), state_file
    features = CachedForward(run.emu, run.links).on_first_stage(lambda: single.ln_visual.weight.detach() + 1,
                                                                (CONFIG.vision.width,))
    torch.testing.assert_close(features, single.ln_visual.weight.detach() + 1)  # the first stage's value everywhere


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_pipeline_stages_decode_and_score_as_one_process(checkpoint, tp, tmp_path):
    """From our checkpoint, an HF export and a state-dict file (safetensors with PP2, a torch
    file with TP2xPP2) each rank reads its stage's tensors only."""
    state = load_for_inference(checkpoint).state_dict()
    if tp == 1:
        from safetensors.torch import save_file

        from megatron_emu.convert.export import export_hf

        state_files = [str(tmp_path / "emu.safetensors"), str(tmp_path / "hf")]
        save_file({k: v.contiguous() for k, v in state.items()}, state_files[0])
        export_hf(checkpoint, state_files[1], build_tiny_tokenizer(), max_shard_bytes=400_000)  # several shards
    else:
        state_files = [str(tmp_path / "emu.pt")]
        torch.save(state, state_files[0])
    spawn(2 * tp, _pp_worker, checkpoint, state_files, tp)


def _generate_text(rank, world_size, argv, expected):
    sys.path.insert(0, TOOLS)
    import generate_text

    assert generate_text.main(argv) == expected, rank


@pytest.mark.parametrize("world, pp", [(2, 1), (4, 2)], ids=["dp2", "dp2xpp2"])
def test_generate_text_splits_the_prompts_over_data_parallel_ranks(checkpoint, world, pp):
    sys.path.insert(0, TOOLS)
    import generate_text

    argv = ["--load", checkpoint, "--prompt", "a red", "--prompt", "once upon", "--prompt", "the", "--batch-size", "1",
            "--max-new-tokens", "3", "--sample", "--seed", "2"]
    expected = generate_text.main(argv)  # one process
    assert [line.split("\t")[0] for line in expected] == ["a red", "once upon", "the"]
    spawn(world, _generate_text, argv + ["--pipeline-model-parallel-size", str(pp)], expected)


def test_layout_errors_are_one_line(checkpoint):
    with pytest.raises(ValueError, match="world size 1 is not divisible by --tensor-model-parallel-size 1 x "
                                         "--pipeline-model-parallel-size 2"):
        build_inference(InferenceConfig(checkpoint, pipeline_model_parallel_size=2))
    with pytest.raises(ValueError, match="no checkpoint to load"):
        build_inference(InferenceConfig(""))


def test_a_state_file_of_another_shape_is_refused_in_one_line(checkpoint, tmp_path):
    """Reading a part checks the whole file first: an extra tensor, a missing one, or a tensor
    of another shape is named, with the file, before anything is loaded."""
    from megatron_emu.generation.loading import read_part
    from megatron_emu.generation.weight_sources import partial_source

    state = load_for_inference(checkpoint).state_dict()
    cases = {
        "extra": (dict(state, **{"llm.extra.weight": torch.zeros(2)}), r"unexpected \['llm.extra.weight'\]"),
        "missing": ({k: v for k, v in state.items() if k != "llm.norm.weight"}, r"missing \['llm.norm.weight'\]"),
        "shape": (dict(state, **{"llm.norm.weight": torch.zeros(3)}), r"llm.norm.weight \(3,\) \(expected \(128,\)\)"),
    }
    for name, (bad, message) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(bad, path)
        source, config = partial_source(path, "tiny")
        with pytest.raises(ValueError, match=f"{path}: not an Emu of this config.*{message}"):
            read_part(source, config, lambda emu: emu)


def test_a_damaged_safetensors_state_file_is_refused_in_one_line(checkpoint, tmp_path):
    from safetensors.torch import save_file

    from megatron_emu.generation.weight_sources import partial_source

    path = str(tmp_path / "emu.safetensors")
    save_file({k: v.contiguous() for k, v in load_for_inference(checkpoint).state_dict().items()}, path)
    data = open(path, "rb").read()
    damaged = {"truncated": (data[:-100], "truncated"), "garbage": (b"\xff" * 64, "header length"),
               "header": (data[:8] + b"{" * (len(data) - 8), "not a readable safetensors file")}
    for name, (content, message) in damaged.items():
        bad = str(tmp_path / f"{name}.safetensors")
        open(bad, "wb").write(content)
        with pytest.raises(ValueError, match=message) as error:
            partial_source(bad, "tiny")
        assert bad in str(error.value) and "\n" not in str(error.value), name


def test_a_bf16_build_allocates_bf16_and_equals_the_fp32_load_cast(checkpoint):
    """--bf16: the part is allocated in bf16 and read into directly (no fp32 copy first); its
    tensors, the rope table included, are bit-identical to the fp32 load cast to bf16."""
    from megatron_emu.generation import loading

    targets, real_copy = [], loading.copy_into
    loading.copy_into = lambda target, whole: targets.append(target.dtype) or real_copy(target, whole)
    try:
        run = build_inference(InferenceConfig(checkpoint, bf16=True))
    finally:
        loading.copy_into = real_copy
    assert targets and set(targets) == {torch.bfloat16}  # read straight into bf16 tensors
    try:
        ours = {**run.emu.state_dict(), "rope": run.emu.llm.rope}
        cast = load_for_inference(checkpoint).to(torch.bfloat16)
        theirs = {**cast.state_dict(), "rope": cast.llm.rope}
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, theirs[name]), name
    finally:
        run.close()
