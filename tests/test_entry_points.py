"""The first five minutes: `--help` answers before torch is imported (it costs seconds), flag
mistakes end in one `error:` line with exit code 2, every tool run bare does a small run or
shows its usage with an example, and a multi-rank run logs its setup once (rank 0)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import exit_probe

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))  # a new tool is covered by being there
# Run bare, these are benchmarks of a minute or more: the default suite asks for --help, `-m slow` runs them bare.
LONG_BARE = {"benchmark_data.py"}


def run_command(command: list[str], cwd, timeout: int = 600, path: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, path)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def error_lines(run: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines of a run that must not have crashed (a traceback fails the test)."""
    output = run.stdout + run.stderr
    assert "Traceback" not in output, output[-3000:]
    return [line for line in output.splitlines() if "error:" in line]

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


@pytest.mark.parametrize("script, flags, message", [
    ("pretrain_emu.py", ["--micro-batch-size", "3", "--global-batch-size", "16"], "--global-batch-size 16 is not divisible"),
    ("pretrain_emu.py", ["--tensor-model-parallel-size", "2"], "start 2 or a multiple with torchrun"),
    ("pretrain_emu.py", ["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible"),
    ("pretrain_emu.py", ["--data-path", "1", "data/nosuch"], "data/nosuch.json: missing or unreadable dataset metadata"),
    ("finetune_decoder.py", ["--preset", "1b"], "--data-path is required"),
    ("finetune_decoder.py", ["--resolution", "60"], "--resolution 60 is not a multiple of 8"),
])
def test_mistakes_are_one_line_before_any_work(script, flags, message, tmp_path):
    run = run_command([sys.executable, str(ROOT / script), *flags], tmp_path, timeout=300)
    errors = error_lines(run)
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], run.stderr[-2000:]
    assert "optimizer: " not in run.stderr and "decoder finetune:" not in run.stderr  # refused before any model


@pytest.mark.parametrize("tool", [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t.name in LONG_BARE else [])
                                  for t in TOOLS])
def test_every_tool_run_bare_is_a_small_run_or_its_usage_with_an_example(tool, tmp_path):
    run = run_command([sys.executable, str(tool)], tmp_path)
    errors = error_lines(run)
    if run.returncode == 2:  # usage: what is missing, and a line to copy
        examples = [line for line in run.stderr.splitlines() if line.startswith("example: python ")]
        assert "usage:" in run.stderr and len(errors) == 1 and len(examples) == 1, run.stderr
    else:
        assert run.returncode == 0 and not errors, run.stderr[-3000:]


@pytest.mark.parametrize("tool", sorted(LONG_BARE))
def test_tools_with_a_long_bare_run_answer_help(tool, tmp_path):
    run = run_command([sys.executable, str(ROOT / "tools" / tool), "--help"], tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("usage:") and not error_lines(run)


def test_only_the_bare_command_keeps_its_checkpoint():
    from megatron_emu.arguments import DEMO_SAVE, parse_args

    bare = parse_args([]).checkpoint
    assert (bare.save, bare.allow_checkpoint_rewind) == (DEMO_SAVE, True) == ("runs/tiny/checkpoints", True)
    flagged = parse_args(["--train-iters", "5"]).checkpoint
    assert (flagged.save, flagged.allow_checkpoint_rewind) == ("", False)  # Megatron's: saves only with --save


def test_summary_windows_never_overlap():
    from megatron_emu.training.train import TrainSummary

    rows = [(i, 10.0 - i, 1.0 / i) for i in range(1, 7)]  # 6 iterations: windows of 3
    text = TrainSummary(history=rows).format()
    assert "lm loss 8.0000 -> 5.0000" in text and "first and last 3 iterations" in text
    assert TrainSummary(history=rows[:1]).format() == "summary: 1 iteration | lm loss 9.0000 | l2 loss 1.0000"
    assert "first and last 10 iterations" in TrainSummary(history=[(i, 1.0, 1.0) for i in range(1, 31)]).format()


@pytest.mark.parametrize("script, flags, setup", [
    ("pretrain_emu.py", ["--train-iters", "1", "--eval-interval", "0"], "optimizer: "),
    ("finetune_decoder.py", ["--train-iters", "1", "--micro-batch-size", "1", "--global-batch-size", "2",
                             "--num-workers", "0", "--device", "cpu"], "decoder finetune: "),
])
def test_two_ranks_log_their_setup_once(script, flags, setup, tmp_path):
    """Under torchrun, rank 0 logs the setup; rank 1 writes no megatron_emu line (it would on an error).
    Each rank ends its process group before exiting (cli.end_process_group): the probe's exit hook runs last."""
    logs = tmp_path / "logs"  # torchrun's --redirects 3: each rank's stdout/stderr in files of its own
    run = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "--log-dir", str(logs), "--redirects", "3", str(ROOT / script), *flags,
                       "--save", str(tmp_path / "save")], tmp_path, path=[exit_probe(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    stderr = {rank: next(logs.glob(f"**/attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)}
    setup_lines = {rank: [line for line in text.splitlines() if " megatron_emu: " in line] for rank, text in stderr.items()}
    assert sum(setup in line for line in setup_lines[0]) == 1, stderr[0]
    assert setup_lines[1] == [], stderr[1]
    for text in stderr.values():
        assert "process group at exit: ended" in text, text[-2000:]
