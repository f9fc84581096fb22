"""tools/convert_checkpoint.py refuses a flag its direction would silently ignore."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"


@pytest.mark.parametrize("direction", [["--from", "emu-v1"], ["--to", "diffusers"]])
def test_tokenizer_model_is_refused_where_unused(tmp_path, direction):
    run = subprocess.run([sys.executable, str(TOOL), *direction, "--input", str(tmp_path / "in"),
                          "--output", str(tmp_path / "out"), "--tokenizer-model", str(tmp_path / "sp.model")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error:" in line]  # then the usage's example line
    assert len(errors) == 1 and errors[0].endswith(f"--tokenizer-model is read only by --to hf (the export writes "
                                                   f"the tokenizer); {' '.join(direction)} does not use it")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
