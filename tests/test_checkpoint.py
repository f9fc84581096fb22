"""Save / resume (single process): exact continuation, atomic `latest`, pruning,
finetune / no-load flags, async save, and clear errors for damaged or foreign checkpoints."""

import dataclasses
import multiprocessing as mp
import os

import pytest
import torch

from megatron_emu.config import CheckpointConfig, TrainConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.training.checkpoint import Checkpointer
from megatron_emu.training.checkpoint_files import LATEST_NAME, iteration_dir, read_latest
from megatron_emu.training.optim import LRScheduler, build_optimizer
from tests.batches import random_batch


class CountingLoader:
    """A deterministic stand-in for the data loader, with the same state_dict protocol."""

    def __init__(self, config):
        self.config, self.position = config, 0

    def __next__(self):
        self.position += 1
        return random_batch(self.config, batch_size=2, seq_length=48, images_per_sample=1, seed=self.position)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def run_config(**ckpt) -> TrainConfig:
    config = TrainConfig(preset="tiny", model=get_preset("tiny"), train_iters=4)
    config.optimizer.lr, config.optimizer.lr_warmup_iters = 1e-3, 2
    config.checkpoint = CheckpointConfig(**ckpt)
    return config


def build(config: TrainConfig, seed: int):
    model = build_emu(config.model, seed=seed)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = LRScheduler(optimizer, config.optimizer, config.train_iters)
    return model, optimizer, scheduler, CountingLoader(config.model)


def step(model, optimizer, scheduler, loader, iteration: int) -> float:
    batch = next(loader)
    optimizer.zero_grad(set_to_none=True)
    loss = emu_loss(*model(batch["tokens"], batch["images"]), batch["tokens"], model.config.special_tokens).total
    loss.backward()
    optimizer.step()
    scheduler.step(iteration)
    return loss.item()


def train(parts, start: int, stop: int) -> list[float]:
    return [step(*parts, iteration) for iteration in range(start + 1, stop + 1)]


def test_resume_continues_exactly(tmp_path):
    config = run_config(save=str(tmp_path), save_interval=2, load=str(tmp_path))
    reference = train(build(config, seed=0), 0, 4)

    first = build(config, seed=0)
    losses = train(first, 0, 2)
    model, optimizer, scheduler, loader = first
    Checkpointer(config.checkpoint, config).save(2, model, optimizer, scheduler, loader, consumed_samples=4)
    torch.manual_seed(999)  # the resumed run must not depend on the RNG it starts with

    resumed = build(config, seed=123)  # different weights until the load
    model, optimizer, scheduler, loader = resumed
    state = Checkpointer(config.checkpoint, config).load(model, optimizer, scheduler, loader)
    assert (state.iteration, state.consumed_samples, loader.position) == (2, 4, 2)
    losses += train(resumed, 2, 4)
    assert losses == reference  # bit-identical, step by step


def _saved_run(tmp_path, **flags):
    config = run_config(save=str(tmp_path), load=str(tmp_path), **flags)
    parts = build(config, seed=0)
    train(parts, 0, 1)
    return config, parts


@pytest.mark.parametrize("crash_at", ["write_data", "finish", "write_latest"])
def test_a_crashed_save_leaves_the_previous_latest_loadable(tmp_path, monkeypatch, crash_at):
    config, (model, optimizer, scheduler, loader) = _saved_run(tmp_path)
    checkpointer = Checkpointer(config.checkpoint, config)
    checkpointer.save(1, model, optimizer, scheduler, loader)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train((model, optimizer, scheduler, loader), 1, 2)

    class Crash(Exception):
        pass

    crashed = []

    def crash(*args, **kwargs):
        crashed.append(crash_at)
        raise Crash(crash_at)

    if crash_at == "write_latest":  # after the rename, before `latest` moves
        monkeypatch.setattr("megatron_emu.training.checkpoint.write_latest", crash)
    else:
        monkeypatch.setattr(torch.distributed.checkpoint.FileSystemWriter, crash_at, crash)
    with pytest.raises(BaseException):  # DCP wraps ours in CheckpointException(BaseException)
        checkpointer.save(2, model, optimizer, scheduler, loader)
    monkeypatch.undo()
    assert crashed == [crash_at]

    assert read_latest(str(tmp_path)) == 1
    fresh = build(config, seed=5)
    assert Checkpointer(config.checkpoint, config).load(*fresh).iteration == 1
    for name, value in fresh[0].state_dict().items():
        assert torch.equal(value, saved[name]), name


def _save_then_die(root: str) -> None:  # runs in a child process
    config = run_config(save=root)
    model, optimizer, scheduler, loader = build(config, seed=0)
    checkpointer = Checkpointer(config.checkpoint, config)
    checkpointer.save(1, model, optimizer, scheduler, loader)
    original = torch.distributed.checkpoint.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        original(self, plan, planner).wait()  # shards on disk, .metadata not yet
        os._exit(17)

    torch.distributed.checkpoint.FileSystemWriter.write_data = write_then_die
    checkpointer.save(2, model, optimizer, scheduler, loader)


def test_a_killed_process_leaves_the_previous_latest(tmp_path):
    child = mp.get_context("spawn").Process(target=_save_then_die, args=(str(tmp_path),))
    child.start()
    child.join(600)  # a loaded 2-core CI box can take minutes to spawn, import torch and save twice
    assert child.exitcode == 17
    assert read_latest(str(tmp_path)) == 1
    assert os.path.isdir(iteration_dir(str(tmp_path), 2) + ".tmp")  # the partial save, ignored
    config = run_config(load=str(tmp_path))
    assert Checkpointer(config.checkpoint, config).load(*build(config, seed=1)).iteration == 1


def test_keep_last_prunes_old_iterations(tmp_path):
    config, parts = _saved_run(tmp_path, keep_last=2)
    checkpointer = Checkpointer(config.checkpoint, config)
    for iteration in (1, 2, 3):
        checkpointer.save(iteration, *parts)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000003", LATEST_NAME]


def test_finetune_and_no_load_optim_skip_what_they_say(tmp_path):
    config, (model, optimizer, scheduler, loader) = _saved_run(tmp_path)
    Checkpointer(config.checkpoint, config).save(1, model, optimizer, scheduler, loader, consumed_samples=2)

    finetune = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, finetune=True))
    model2, optimizer2, scheduler2, loader2 = build(finetune, seed=7)
    state = Checkpointer(finetune.checkpoint, finetune).load(model2, optimizer2, scheduler2, loader2)
    assert (state.iteration, loader2.position, len(optimizer2.state)) == (0, 0, 0)
    assert torch.equal(model2.llm.output.weight, model.llm.output.weight)

    no_optim = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, no_load_optim=True))
    model3, optimizer3, scheduler3, loader3 = build(no_optim, seed=7)
    state = Checkpointer(no_optim.checkpoint, no_optim).load(model3, optimizer3, scheduler3, loader3)
    assert (state.iteration, state.consumed_samples, loader3.position, len(optimizer3.state)) == (1, 2, 1, 0)


def test_async_save_snapshots_the_state_at_the_call(tmp_path):
    config, (model, optimizer, scheduler, loader) = _saved_run(tmp_path, async_save=True)
    checkpointer = Checkpointer(config.checkpoint, config)
    checkpointer.save(1, model, optimizer, scheduler, loader)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train((model, optimizer, scheduler, loader), 1, 2)  # training goes on while it writes
    checkpointer.wait()
    assert read_latest(str(tmp_path)) == 1
    fresh = build(config, seed=3)
    Checkpointer(config.checkpoint, config).load(*fresh)
    assert all(torch.equal(v, saved[k]) for k, v in fresh[0].state_dict().items())


def test_load_of_the_runs_own_empty_save_starts_from_scratch(tmp_path):
    # Any other --load without a checkpoint is an error: tests/test_failsafe_checkpoint.py
    config = run_config(load=str(tmp_path / "nothing-here"), save=str(tmp_path / "nothing-here"))
    assert Checkpointer(config.checkpoint, config).load(*build(config, seed=0)).iteration == 0


def test_another_model_size_is_refused_naming_the_field(tmp_path):
    config, parts = _saved_run(tmp_path)
    Checkpointer(config.checkpoint, config).save(1, *parts)
    other = run_config(load=str(tmp_path))
    other.model.llm.hidden = 256
    with pytest.raises(ValueError, match=r"model\.llm\.hidden: checkpoint 128 vs this run 256"):
        Checkpointer(other.checkpoint, other).load(*build(other, seed=0))


def test_a_missing_shard_is_named(tmp_path):
    config, parts = _saved_run(tmp_path)
    Checkpointer(config.checkpoint, config).save(1, *parts)
    directory = iteration_dir(str(tmp_path), 1)
    shard = next(n for n in os.listdir(directory) if n.endswith(".distcp"))
    os.remove(os.path.join(directory, shard))
    with pytest.raises(ValueError, match=f"shard {shard} is missing"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))


def test_latest_pointing_at_nothing_is_an_error(tmp_path):
    (tmp_path / LATEST_NAME).write_text("40")
    config = run_config(load=str(tmp_path))
    with pytest.raises(ValueError, match="names iteration 40 but .*iter_0000040 is missing"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))
