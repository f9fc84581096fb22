"""Instruction tuning end to end (tiny, CPU): the answer loss falls, the base stays bit-identical,
only adapters get optimizer state and checkpoints, a pretraining base grows by two rows,
resume is exact, another base is refused."""

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_emu.arguments import parse_args
from megatron_emu.model.lora import is_lora_parameter
from megatron_emu.training.checkpoint_files import iteration_dir, read_run_config
from megatron_emu.training.build import build_run
from megatron_emu.training.train import load_tokenizer, move_batch, pretrain
from megatron_emu.training.step import train_step
from megatron_emu.data.loader import build_pretrain_loader
from megatron_emu.training.instruct import init_chat_token_rows
from tests.instruct_fixtures import write_counting_alpaca
from tools.preprocess_data import main as preprocess_main

COMMON = ["--num-workers", "0", "--device", "cpu", "--log-interval", "100", "--seq-length", "64",
          "--micro-batch-size", "2", "--global-batch-size", "2"]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    prefix = str(root / "count")
    preprocess_main(["--input-type", "alpaca", "--input", write_counting_alpaca(str(root / "count_alpaca.json")),
                     "--output-prefix", prefix, "--no-progress"])
    return prefix


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretraining checkpoint (4 added tokens: base + 4 vocabulary rows)."""
    save = str(tmp_path_factory.mktemp("base") / "ckpt")
    pretrain(parse_args(COMMON + ["--train-iters", "1", "--save", save, "--seq-length", "80"]))
    return save


def read_model(directory: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(directory, "..", os.path.basename(directory) + ".pt")
    dcp_to_torch_save(directory, out)
    state = torch.load(out, weights_only=False)["model"]
    return state


def instruct_flags(conversations, *extra):
    return parse_args(["--lora-rank", "16", "--data-path", "1", conversations, "--lr-warmup-iters", "1",
                       "--lr-decay-iters", "8", *COMMON, *extra])


def test_answer_loss_falls_base_bit_identical_optimizer_state_adapters_only(conversations):
    config = instruct_flags(conversations)
    tokenizer = load_tokenizer(config)
    run = build_run(config)  # as pretraining builds it (training/build.py)
    pmodel, optimizer = run.pmodel, run.optimizer
    model = pmodel.parts[0]
    init_chat_token_rows([model], tokenizer)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not is_lora_parameter(n)}
    loader = build_pretrain_loader(config.data, tokenizer, dp_rank=0, dp_size=1, seed=config.seed,
                                   tokens_per_image=config.model.tokens_per_image)
    fixed = move_batch(next(loader), torch.device("cpu"))  # the same batch: its answer loss must fall
    try:
        losses = [train_step(pmodel, optimizer, [fixed], config).lm_loss for _ in range(6)]
    finally:
        run.close()
    assert losses[-1] < losses[0] - 0.5, losses
    for name, p in model.named_parameters():
        if not is_lora_parameter(name):
            assert torch.equal(p, base[name]), name  # bit-identical
            assert p.grad is None
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_lora_parameter(n))
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.ndim > 0)
    assert state_bytes == 2 * adapter_bytes  # exp_avg + exp_avg_sq of the adapters, nothing of the base
    print(f"adapter {adapter_bytes} B, optimizer state {state_bytes} B, "
          f"base {sum(p.numel() * p.element_size() for p in base.values())} B")


def test_adapter_checkpoints_grow_base_resume_exact_refuse_other_base(conversations, base, tmp_path):
    save = str(tmp_path / "adapters")
    reference = pretrain(instruct_flags(conversations, "--train-iters", "4", "--pretrained-checkpoint", base)).history
    first = pretrain(instruct_flags(conversations, "--train-iters", "2", "--pretrained-checkpoint", base,
                                    "--save", save)).history
    directory = iteration_dir(save, 2)
    keys = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(is_lora_parameter(k) for k in model_keys)  # adapters only
    assert read_run_config(directory)["pretrained_checkpoint"]["directory"].startswith(base)
    second = pretrain(instruct_flags(conversations, "--train-iters", "4", "--pretrained-checkpoint", base,
                                     "--load", save)).history
    assert first + second == reference  # exact resume

    # --lora-merge: a full checkpoint whose projections are W + (alpha / r) B A.
    merged = str(tmp_path / "merged")
    pretrain(instruct_flags(conversations, "--train-iters", "2", "--pretrained-checkpoint", base, "--load", save,
                            "--lora-merge", "--save", merged))
    adapters, full, base_state = (read_model(d) for d in (directory, iteration_dir(merged, 2), iteration_dir(base, 1)))
    name = "llm.layers.1.attention.wo"
    delta = adapters[f"{name}.lora.lora_B"] @ adapters[f"{name}.lora.lora_A"]  # alpha / r = 1
    assert delta.abs().max() > 0
    torch.testing.assert_close(full[f"{name}.weight"], base_state[f"{name}.weight"] + delta)
    assert not any(is_lora_parameter(k) for k in full)
    recorded = json.load(open(os.path.join(iteration_dir(merged, 2), "checksums.json")))  # written like every save
    assert "run_config.json" in json.dumps(recorded) and not os.path.exists(iteration_dir(merged, 2) + ".tmp")
    assert full["llm.tok_embeddings.weight"].shape[0] == base_state["llm.tok_embeddings.weight"].shape[0] + 2
    torch.testing.assert_close(full["llm.tok_embeddings.weight"][:-2], base_state["llm.tok_embeddings.weight"])

    other = str(tmp_path / "other")
    pretrain(parse_args(COMMON + ["--train-iters", "1", "--save", other, "--seq-length", "80", "--seed", "7"]))
    with pytest.raises(ValueError, match="refusing --pretrained-checkpoint"):
        pretrain(instruct_flags(conversations, "--train-iters", "4", "--pretrained-checkpoint", other, "--load", save))
