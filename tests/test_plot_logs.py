"""tools/plot_logs.py: runs overlaid in one PNG of a fixed size; a directory without events is one line."""

import importlib.util
import os
import subprocess
import sys

import matplotlib.image
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("plot_logs", os.path.join(ROOT, "tools", "plot_logs.py"))
plot_logs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_logs)


def write_run(directory, batch_size, scale):
    """Event files as pretrain_emu.py writes them: each tag against iterations and samples."""
    with SummaryWriter(str(directory)) as writer:
        for it in range(1, 11):
            for tag, value in (("lm loss", scale * 6 / it), ("l2 loss", scale / it), ("learning-rate", 1e-3),
                               ("grad-norm", 2.0 / it), ("tokens-per-sec", 1000.0 + it)):
                writer.add_scalar(tag, value, it)
                writer.add_scalar(f"{tag} vs samples", value, it * batch_size)
        writer.add_scalar("lm loss validation", scale * 0.5, 10)
        writer.add_scalar("lm loss validation vs samples", scale * 0.5, 10 * batch_size)


def test_two_runs_one_png_of_the_figure_size(tmp_path):
    write_run(tmp_path / "a", 16, 1.0)
    write_run(tmp_path / "b", 32, 1.2)
    series = plot_logs.read_events(str(tmp_path / "b"), "samples")
    assert series["lm loss"][0] == [32 * it for it in range(1, 11)]  # x = consumed samples
    for x in ("iterations", "samples"):
        out = str(tmp_path / f"{x}.png")
        plot_logs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--x", x, "--out", out])
        height, width, _ = matplotlib.image.imread(out).shape
        assert (width, height) == (plot_logs.FIGSIZE[0] * plot_logs.DPI, plot_logs.FIGSIZE[1] * plot_logs.DPI)


def test_text_log_is_read_too(tmp_path):
    line = (" iteration {it:8d}/      10 | consumed samples: {s:12d} | elapsed time per iteration (ms): 100.0 | "
            "learning rate: 1.000E-03 | global batch size:    16 | lm loss: {lm:.6E} | l2 loss: 1.000000E-02 | "
            "grad norm: 0.500 | tokens/s: 1000.0 | TFLOP/s/GPU: 0.010 |")
    log = tmp_path / "log.txt"
    log.write_text("\n".join(line.format(it=it, s=16 * it, lm=6.0 / it) for it in (1, 5, 10)) +
                   "\n validation loss at iteration 10 | lm loss value: 5.000000E-01 | lm loss PPL: 1.6E+00 |"
                   " l2 loss value: 1.0E-02 |\n")
    series = plot_logs.read_text_log(str(log), "samples")
    assert series["lm loss"] == ([16, 80, 160], [6.0, 1.2, 0.6])
    assert series["lm loss validation"] == ([160], [0.5])
    plot_logs.main([str(log), "--out", str(tmp_path / "log.png")])
    assert os.path.getsize(tmp_path / "log.png") > 0


def test_directory_without_events_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_logs.py"), str(tmp_path / "empty")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{tmp_path / 'empty'}: no TensorBoard event files with scalars (expected a --tensorboard-dir)"
