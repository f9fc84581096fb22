"""The first five minutes: `--help` answers before torch is imported (it costs seconds), and
flag mistakes end in one `error:` line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs an entry point with --help and reports whether torch got imported on the way.
HELP_PROBE = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("script", ["pretrain_emu.py", "finetune_decoder.py"])
def test_help_does_not_import_torch(script):
    code = HELP_PROBE.format(script=script, path=str(ROOT / script))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "usage:" in out and out.strip().endswith("torch imported: False"), out


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "16"], "--global-batch-size 16 is not divisible"),
    (["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible"),
    (["--data-path", "1", "data/nosuch"], "data/nosuch.json: missing or unreadable dataset metadata"),
])
def test_mistakes_are_one_line_before_any_work(flags, message):
    run = subprocess.run([sys.executable, str(ROOT / "pretrain_emu.py"), *flags], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "optimizer: " not in run.stderr  # refused before the model and its optimizer were built


def test_summary_windows_never_overlap():
    from megatron_emu.training.train import TrainSummary

    rows = [(i, 10.0 - i, 1.0 / i) for i in range(1, 7)]  # 6 iterations: windows of 3
    text = TrainSummary(history=rows).format()
    assert "lm loss 8.0000 -> 5.0000" in text and "first and last 3 iterations" in text
    assert TrainSummary(history=rows[:1]).format() == "summary: 1 iteration | lm loss 9.0000 | l2 loss 1.0000"
    assert "first and last 10 iterations" in TrainSummary(history=[(i, 1.0, 1.0) for i in range(1, 31)]).format()
