"""The decoder's checkpoint save on a full disk: one line, the partial file removed, `latest`
unchanged; and torch's zip writer's disguise of it ("unexpected pos") is seen through."""

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_emu.decoder import checkpoint
from megatron_emu.training import checkpoint_guard


def fill_up(error: BaseException):
    def save(state, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file, then the device is full
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
    assert checkpoint.load_checkpoint(save) == {"step": 1}
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    checkpoint.save_checkpoint(save, 2, {"step": 2})  # space freed: the next save goes through
    assert checkpoint.load_checkpoint(save) == {"step": 2}


def test_another_save_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", fill_up(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        checkpoint.save_checkpoint(str(tmp_path / "dec"), 1, {"step": 1})
    assert os.listdir(tmp_path / "dec") == []
