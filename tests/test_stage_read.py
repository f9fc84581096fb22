"""tools/benchmark_stage_read.py: the sparse state file it measures with, and one run."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark_stage_read as stage_read  # noqa: E402

from megatron_emu.config import get_preset  # noqa: E402
from megatron_emu.model.emu import build_emu  # noqa: E402


def test_sparse_state_file_holds_every_tensor_and_no_blocks(tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    size = stage_read.write_sparse_state_file(path, "tiny")
    assert os.path.getsize(path) == size and os.stat(path).st_blocks * 512 < size / 4  # a hole, not data
    row = stage_read.build_stage(path, "tiny", pp=2, stage=1, whole=False)
    layers = get_preset("tiny").llm.layers
    assert (row["variant"], row["stage_layers"]) == ("part", [layers // 2, layers // 2])
    last = build_emu(get_preset("tiny"), device="meta")
    stage_params = sum(t.numel() for n, t in last.state_dict().items()
                       if n.startswith(("llm.norm", "llm.output", "regression_head"))
                       or any(n.startswith(f"llm.layers.{i}.") for i in range(layers // 2, layers)))
    assert row["stage_gib_fp32"] * 2**30 == stage_params * 4
    whole = stage_read.build_stage(path, "tiny", pp=2, stage=1, whole=True)  # read whole, then cut
    assert (whole["variant"], whole["stage_gib_fp32"]) == ("whole", row["stage_gib_fp32"])
