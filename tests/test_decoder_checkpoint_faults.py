"""Faults at the decoder's checkpoints: a full disk at save (one line, the partial file
removed, `latest` unchanged, torch's zip writer's disguise "unexpected pos" seen through);
a flipped byte or a partial copy of state.pt at resume (refused in one line: torch.load
itself would read it silently)."""

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_emu.decoder import checkpoint
from megatron_emu.training import checkpoint_guard


def fill_up(error: BaseException):
    def save(state, file):
        file.write(b"\0" * 1000)  # part of the file, then the device is full
        raise error
    return save


@pytest.mark.parametrize("disguised", [False, True], ids=["ENOSPC", "unexpected pos"])
def test_a_full_disk_keeps_latest_and_leaves_no_partial_save(tmp_path, monkeypatch, disguised):
    save = str(tmp_path / "dec")
    checkpoint.save_checkpoint(save, 1, {"step": 1})
    real_save = torch.save
    if disguised:  # what torch's zip writer raises, with the device (nearly) full
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1026752 vs 1026640")
        monkeypatch.setattr(checkpoint_guard.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    else:
        error = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", fill_up(error))
    with pytest.raises(OSError, match=f"cannot save decoder step 2: no space left on the device holding {save}; "
                                      "removed the partial save, latest stays at iter_0000001") as caught:
        checkpoint.save_checkpoint(save, 2, {"step": 2})
    assert caught.value.errno == errno.ENOSPC  # training/errors.py prints it as one line, exit code 1
    assert sorted(os.listdir(save)) == ["iter_0000001", "latest"]
    assert sorted(os.listdir(os.path.join(save, "iter_0000001"))) == ["state.json", "state.pt"]
    assert checkpoint.load_checkpoint(save) == {"step": 1}
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    checkpoint.save_checkpoint(save, 2, {"step": 2})  # space freed: the next save goes through
    assert checkpoint.load_checkpoint(save) == {"step": 2}


def test_another_save_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", fill_up(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        checkpoint.save_checkpoint(str(tmp_path / "dec"), 1, {"step": 1})
    assert os.listdir(tmp_path / "dec") == []


@pytest.mark.parametrize("damage", ["flipped byte", "partial copy"])
def test_a_changed_state_file_is_refused_at_resume(tmp_path, damage):
    save = str(tmp_path / "dec")
    checkpoint.save_checkpoint(save, 1, {"unet": torch.randn(1000, 64), "step": 1})
    state = os.path.join(save, "iter_0000001", "state.pt")
    data = bytearray(open(state, "rb").read())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01  # inside the tensor's bytes: torch.load would not notice
        message = r"checksum xxh3_64 [0-9a-f]+ differs from [0-9a-f]+ recorded in .*state.json: the file changed"
    else:
        data = data[: len(data) - 100]
        message = rf"{len(data)} bytes, .*state.json recorded {len(data) + 100}: the file changed"
    open(state, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"^{state}: {message}.*resume from an earlier iter_"):
        checkpoint.load_checkpoint(save)


def test_a_checkpoint_of_an_earlier_release_loads_with_a_warning(tmp_path, caplog):
    save = str(tmp_path / "dec")
    checkpoint.save_checkpoint(save, 1, {"step": 1})
    os.remove(os.path.join(save, "iter_0000001", "state.json"))
    with caplog.at_level("WARNING", logger="megatron_emu"):
        assert checkpoint.load_checkpoint(save) == {"step": 1}
    assert "no state.json (saved by an earlier release): loaded unverified" in caplog.text


def test_a_killed_save_is_swept_by_the_next_one(tmp_path):
    """SIGKILL mid-save leaves iter_N/state.pt.tmp (a whole state's bytes) and no state.pt:
    `latest` never named it, and the next save removes it."""
    save = str(tmp_path / "dec")
    checkpoint.save_checkpoint(save, 1, {"step": 1})
    killed = os.path.join(save, "iter_0000002")
    os.makedirs(killed)
    open(os.path.join(killed, "state.pt.tmp"), "wb").write(b"\0" * 1000)
    assert checkpoint.load_checkpoint(save) == {"step": 1}
    checkpoint.save_checkpoint(save, 3, {"step": 3})
    assert sorted(os.listdir(save)) == ["iter_0000001", "iter_0000003", "latest"]
    assert checkpoint.load_checkpoint(save) == {"step": 3}
