"""--load / --save rules, LR-schedule mismatches, --save checked before iteration 1, and a
disk that fills during a save: each fault injected, nothing good lost, one clear error."""

import dataclasses
import errno
import os
from collections import namedtuple

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.training import failsafe, train
from megatron_emu.training.checkpoint import Checkpointer
from megatron_emu.training.checkpoint_files import LATEST_NAME, iteration_dir, list_iterations, read_latest
from megatron_emu.training.failsafe import checkpoint_bytes
from tests.failsafe_faults import FLAGS, disk_full_after
from tests.test_checkpoint import build, run_config, train as train_steps


def saved(root, iterations=(1,), **flags):
    """A checkpoint directory holding these iterations, and the run that wrote it."""
    config = run_config(save=str(root), load=str(root), **flags)
    parts = build(config, seed=0)
    done = 0
    for it in iterations:
        train_steps(parts, done, it)
        checkpointer = Checkpointer(config.checkpoint, config)
        checkpointer.save(it, *parts)
        checkpointer.wait()
        done = it
    return config, parts


# -- --load ----------------------------------------------------------------------
def test_a_typo_in_load_is_an_error_naming_the_path(tmp_path):
    config = run_config(load=str(tmp_path / "typo"), save=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=f"--load {tmp_path / 'typo'}: no such directory"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))


def test_an_existing_directory_without_checkpoint_is_an_error(tmp_path):
    config = run_config(load=str(tmp_path))  # not this run's --save
    with pytest.raises(ValueError, match=f"--load {tmp_path} holds no checkpoint"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))


def test_the_runs_own_empty_save_starts_from_scratch(tmp_path):
    for root in (tmp_path / "new", tmp_path):  # not created yet; created and empty
        config = run_config(load=str(root), save=str(root) + "/")
        assert Checkpointer(config.checkpoint, config).load(*build(config, seed=0)).iteration == 0


def test_own_save_with_iterations_but_no_latest_is_an_error(tmp_path):
    config, parts = saved(tmp_path)
    os.remove(tmp_path / LATEST_NAME)
    with pytest.raises(ValueError, match="holds iteration directories but no latest_checkpointed_iteration.txt"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))


# -- latest never moves backwards ---------------------------------------------------
def test_saving_below_latest_is_refused_and_keeps_everything(tmp_path):
    config, parts = saved(tmp_path, iterations=(1, 3))
    with pytest.raises(ValueError, match=r"holds iteration 3 .*saving iteration 2 would move it backwards.*--allow-checkpoint-rewind"):
        Checkpointer(config.checkpoint, config).save(2, *parts)
    assert read_latest(str(tmp_path)) == 3 and list_iterations(str(tmp_path)) == [1, 3]
    allowed = dataclasses.replace(config.checkpoint, allow_checkpoint_rewind=True)
    Checkpointer(allowed, config).save(2, *parts)
    assert read_latest(str(tmp_path)) == 2


def test_a_run_that_would_rewind_save_fails_before_training(tmp_path, monkeypatch):
    saved(tmp_path, iterations=(3,))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before checking --save"))
    with pytest.raises(ValueError, match=r"holds iteration 3 .*this run starts at iteration 0 would move it backwards"):
        train.pretrain(parse_args(FLAGS + ["--train-iters", "4", "--save", str(tmp_path)]))


# -- the LR schedule on resume ------------------------------------------------------
@pytest.mark.parametrize("field, flag, value", [("lr", "--lr", 5e-3), ("min_lr", "--min-lr", 1e-5),
                                                ("lr_vision", "--lr-vision", 1e-4),
                                                ("lr_decay_style", "--lr-decay-style", "linear")])
def test_a_changed_schedule_flag_is_an_error_naming_it(tmp_path, field, flag, value):
    saved(tmp_path)
    config = run_config(load=str(tmp_path))
    setattr(config.optimizer, field, value)
    with pytest.raises(ValueError, match=f"{flag}: checkpoint .* vs this run {value!r}.*--override-opt-param-scheduler"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=0))


@pytest.mark.parametrize("winner", ["flags", "checkpoint"])
def test_override_or_checkpoint_scheduler_decides_the_peak(tmp_path, winner):
    original, _ = saved(tmp_path)
    config = run_config(load=str(tmp_path))
    config.optimizer.lr = config.optimizer.lr_vision = config.optimizer.lr_causal_former = 5e-3
    config.optimizer.override_opt_param_scheduler = winner == "flags"
    config.optimizer.use_checkpoint_opt_param_scheduler = winner == "checkpoint"
    model, optimizer, scheduler, loader = build(config, seed=0)
    Checkpointer(config.checkpoint, config).load(model, optimizer, scheduler, loader)
    peak = 5e-3 if winner == "flags" else original.optimizer.lr
    assert {g["max_lr"] for g in optimizer.param_groups} == {peak}
    assert scheduler.config.lr == peak and scheduler.iteration == 1


# -- --save before iteration 1 -------------------------------------------------------
def test_an_unwritable_save_fails_before_iteration_1(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")  # a path under a regular file: not creatable, even by root
    save = str(tmp_path / "file" / "ckpt")
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before checking --save"))
    with pytest.raises(ValueError, match=f"--save {save} is not writable: Not a directory"):
        train.pretrain(parse_args(FLAGS + ["--train-iters", "4", "--save", save]))


def test_a_save_without_room_for_a_checkpoint_fails_before_iteration_1(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(failsafe.shutil, "disk_usage", lambda path: Usage(2**30, 2**30 - 2**20, 2**20))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before checking --save"))
    with pytest.raises(ValueError, match=r"--save .*: 0.00 GiB free on its device, but one checkpoint needs about 0.02 GiB"):
        train.pretrain(parse_args(FLAGS + ["--train-iters", "4", "--save", str(tmp_path)]))


def test_checkpoint_bytes_is_the_size_of_a_save(tmp_path):
    config, (model, optimizer, *_) = saved(tmp_path)
    on_disk = sum(os.path.getsize(os.path.join(iteration_dir(str(tmp_path), 1), n))
                  for n in os.listdir(iteration_dir(str(tmp_path), 1)))
    expected = checkpoint_bytes([model], optimizer)
    assert expected == 3 * 4 * sum(p.numel() for p in model.parameters())
    assert 0.8 < expected / on_disk < 1.0  # DCP adds per-tensor metadata (a larger share on tiny)


# -- a full disk during a save ---------------------------------------------------------
@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_is_named_and_the_partial_save_removed(tmp_path, monkeypatch, async_save):
    config, parts = saved(tmp_path, async_save=async_save)
    stray = tmp_path / f"{LATEST_NAME}.tmp.4242"  # left by a process killed mid-publish
    stray.write_text("7")
    disk_full_after(monkeypatch, items=5)
    checkpointer = Checkpointer(config.checkpoint, config)
    with pytest.raises(OSError, match=f"cannot save iteration 2: no space left on the device holding {tmp_path}; "
                                      f"removed the partial save .*iter_0000002.tmp, latest stays at iteration 1") as e:
        checkpointer.save(2, *parts)
        checkpointer.wait()
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", LATEST_NAME]  # stray temp file swept too
    assert read_latest(str(tmp_path)) == 1
    Checkpointer(config.checkpoint, config).load(*build(config, seed=3))  # still loadable


def test_a_full_disk_before_the_shards_is_named_too(tmp_path, monkeypatch):
    config, parts = saved(tmp_path)

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpointer, "_write_run_config", no_room)
    with pytest.raises(OSError, match=f"cannot save iteration 2: no space left on the device holding {tmp_path}"):
        Checkpointer(config.checkpoint, config).save(2, *parts)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", LATEST_NAME] and read_latest(str(tmp_path)) == 1
