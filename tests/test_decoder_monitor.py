"""finetune_decoder.py writes its own scalars to TensorBoard, equal to what its log line prints."""

import re

import pytest

from tests.monitor_logs import read_events, scalars_at
from tests.test_decoder_fixtures import decoder_assets  # noqa: F401

LINE = re.compile(r"iteration\s+(\d+)/\d+ \| lr (\S+) \| loss (\S+) \| grad norm (\S+) \| dropped (\S+) \| (\S+) samples/s")


def test_decoder_scalars_in_tensorboard(decoder_assets, tmp_path, capsys):  # noqa: F811
    from finetune_decoder import main

    tb = str(tmp_path / "tb")
    main(["--preset", "tiny", "--emu-load", decoder_assets["emu"], "--pretrained-sd", decoder_assets["sd"],
          "--data-path", "7", decoder_assets["coco"], "2", decoder_assets["aesthetics"], "--micro-batch-size", "2",
          "--global-batch-size", "2", "--resolution", "64", "--train-iters", "2", "--lr", "1e-3",
          "--lr-warmup-iters", "2", "--num-workers", "0", "--log-interval", "1", "--ema-decay", "0.9",
          "--tensorboard-dir", tb])
    printed = {int(m[1]): [float(v) for v in m.groups()[1:]] for m in LINE.finditer(capsys.readouterr().out)}
    assert sorted(printed) == [1, 2]
    events = read_events(tb)
    for tag in ("diffusion loss", "learning-rate", "grad-norm", "ema-decay", "images-per-sec", "condition-drop-fraction"):
        assert f"{tag} vs samples" in events.Tags()["scalars"], tag
    values = {tag: scalars_at(events, tag) for tag in events.Tags()["scalars"]}
    for step, (lr, loss, grad_norm, dropped, rate) in printed.items():
        assert values["learning-rate"][step] == pytest.approx(lr, rel=6e-4)
        assert values["diffusion loss"][step] == pytest.approx(loss, abs=6e-6)
        assert values["grad-norm"][step] == pytest.approx(grad_norm, abs=6e-4)
        assert values["condition-drop-fraction"][step] == pytest.approx(dropped, abs=6e-4)
        assert values["images-per-sec"][step] == pytest.approx(rate, abs=0.06)
        assert values["ema-decay"][step] == pytest.approx(0.9)
    assert values["diffusion loss vs samples"] == {2: values["diffusion loss"][1], 4: values["diffusion loss"][2]}
