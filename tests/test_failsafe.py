"""Non-finite steps (skipped, counted, never saved), too many of them in a row (exit 1),
and the one-line errors of pretrain_emu.py: single process, faults injected."""

import math
import os
import signal

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import pretrain_emu
from megatron_emu.arguments import parse_args
from megatron_emu.training.checkpoint_files import iteration_dir, list_iterations, read_latest
from megatron_emu.training import train
from megatron_emu.training.failsafe import RunStopped
from megatron_emu.training.train import pretrain
from tests.failsafe_faults import FLAGS, nan_loss_at


def saved_tensors(root: str, iteration: int, tmp_path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of one saved iteration, by name."""
    out = str(tmp_path / f"flat{iteration}.pt")
    dcp_to_torch_save(iteration_dir(root, iteration), out)
    state = torch.load(out, weights_only=False)
    return {f"{section}.{k}": v for section in ("model", "optim") for k, v in state[section].items() if torch.is_tensor(v)}


def test_a_nan_step_is_skipped_and_changes_nothing(tmp_path, monkeypatch, capsys):
    save = str(tmp_path / "ckpt")
    nan_loss_at(monkeypatch, {3, 4})
    summary = pretrain(parse_args(FLAGS + ["--train-iters", "4", "--save", save, "--save-interval", "2"]))
    assert [math.isnan(lm) for _, lm, _ in summary.history] == [False, False, True, True]
    before, after = saved_tensors(save, 2, tmp_path), saved_tensors(save, 4, tmp_path)
    assert before.keys() == after.keys() and any(k.endswith("exp_avg_sq") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # params and Adam moments untouched
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration " in line]
    assert "number of skipped iterations:   0 | number of nan iterations:   0" in lines[1]
    assert "number of skipped iterations:   1 | number of nan iterations:   1" in lines[2]


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {2, 3, 4, 5, 6})
    with pytest.raises(SystemExit) as stop:
        pretrain_emu.main(FLAGS + ["--train-iters", "8", "--max-skipped-iterations", "3"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 3 iterations in a row skipped (up to iteration 4)")
    assert "--max-skipped-iterations 3" in err[-1] and "Traceback" not in "".join(err)


def test_lr_1e6_stops_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    """The issue's run: NaN from iteration 2 on; --keep-last 1 must keep a finite checkpoint."""
    save = str(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as stop:
        pretrain_emu.main(FLAGS + ["--train-iters", "10", "--lr", "1e6", "--lr-vision", "1e6", "--lr-causal-former", "1e6",
                                   "--max-skipped-iterations", "3", "--save", save, "--save-interval", "1", "--keep-last", "1"])
    assert stop.value.code == 1 and "iterations in a row skipped" in capsys.readouterr().err
    assert list_iterations(save) == [read_latest(save)]
    assert all(bool(torch.isfinite(t).all()) for t in saved_tensors(save, read_latest(save), tmp_path).values())


def test_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    """Without the step check, NaN reaches the weights: the save is refused, latest kept."""
    save = str(tmp_path / "ckpt")
    nan_loss_at(monkeypatch, {3})
    with pytest.raises(RunStopped, match=r"refusing to save iteration 4 to .*: \d+ tensors hold NaN/inf.*latest stays at iteration 2"):
        pretrain(parse_args(FLAGS + ["--train-iters", "4", "--save", save, "--save-interval", "2", "--keep-last", "1",
                                     "--no-check-for-nan-in-loss-and-grad"]))
    assert read_latest(save) == 2 and sorted(os.listdir(save)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert all(bool(torch.isfinite(t).all()) for t in saved_tensors(save, 2, tmp_path).values())


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain_emu.main(FLAGS + ["--train-iters", "1", "--load", str(tmp_path / "typo")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err)
    assert err[-1:] == [f"error: --load {tmp_path / 'typo'}: no such directory; only the run's own, still empty --save may "
                   "start from scratch (leave out --load, or give an iteration directory)"]


# -- stopping on purpose: signal, duration, interval -------------------------------------
@pytest.mark.parametrize("flags, stop_at, reason", [
    (["--exit-interval", "2"], 2, "--exit-interval 2 reached"),
    (["--exit-duration-in-mins", "0"], 1, "--exit-duration-in-mins 0.0 reached"),
    (["--exit-signal-handler", "--exit-signal", "SIGUSR1"], 2, "exit signal received"),
])
def test_an_exit_condition_saves_and_returns(tmp_path, monkeypatch, flags, stop_at, reason):
    save = str(tmp_path / "ckpt")
    real_step, calls = train.train_step, [0]

    def step_then_signal(*args, **kwargs):  # SLURM's --signal=B:USR1 arriving during step 2
        calls[0] += 1
        if calls[0] == 2 and "--exit-signal" in flags:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        summary = pretrain(parse_args(FLAGS + ["--train-iters", "6", "--save", save, "--save-interval", "4", *flags]))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert len(summary.history) == stop_at and summary.exit_reason.startswith(reason)
    assert read_latest(save) == stop_at  # saved where it stopped (not at a --save-interval)


def test_a_run_stopped_by_an_error_closes_its_sinks_before_returning(tmp_path, monkeypatch):
    """Not only at interpreter exit: a caller that goes on (a notebook, a sweep) gets the
    TensorBoard events flushed and the writer closed when pretrain raises."""
    from megatron_emu.training import monitor

    closed = []
    real_close = monitor.Sinks.close
    monkeypatch.setattr(monitor.Sinks, "close", lambda self: closed.append(self.tensorboard is not None) or
                        real_close(self))
    nan_loss_at(monkeypatch, {2, 3, 4, 5, 6})
    with pytest.raises(RunStopped):
        pretrain(parse_args(FLAGS + ["--train-iters", "8", "--max-skipped-iterations", "3",
                                     "--tensorboard-dir", str(tmp_path / "tb"), "--log-interval", "1"]))
    assert closed[:1] == [True]  # closed while the writer was open, i.e. by pretrain, not by atexit
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "tb" / events[0])).Reload().Scalars("lm loss")
    assert [s.step for s in scalars] == [1, 2, 3]  # every logged iteration is on disk (4 raised before its log)
