"""The example launch scripts' pretrain_emu.py flags parse into a valid configuration
(the scripts themselves need a cluster; their flags must not rot)."""

import re
import shlex
from pathlib import Path

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.parallel.mesh import ParallelDims

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").rglob("*")
                  if p.suffix in (".sh", ".sbatch") and "pretrain_emu.py" in p.read_text())  # launch scripts


def defaults(text: str) -> dict[str, str]:
    """`X=${X:-default}` and `X=${X-"default"}` assignments: {X: default}."""
    return dict(re.findall(r'^(\w+)=\$\{\w+:?-"?([^}"]*)"?\}', text, flags=re.M))


def substituted(text: str, known: dict[str, str]) -> str:
    """Shell variables replaced by their defaults (`known`, or `${X:-default}` in place) or by /X (paths)."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: known.get(m.group(1), "/" + m.group(1)), text)


def pretrain_flags(script: Path) -> list[str]:
    """The arguments after pretrain_emu.py, continuation lines joined, variables substituted."""
    text = script.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if "pretrain_emu.py" in l and not l.lstrip().startswith("#"))
    args = line.split("pretrain_emu.py", 1)[1].replace('"$@"', "").rstrip().removesuffix("&")  # run in the background
    return shlex.split(substituted(args, defaults(text)))


def world_size(script: Path) -> int:
    """torchrun's --nproc-per-node times the #SBATCH --nodes (1 when not given)."""
    text = script.read_text()
    per_node = int(shlex.split(substituted(re.search(r"--nproc-per-node[ =](\S+)", text).group(1), defaults(text)))[0])
    nodes = re.search(r"^#SBATCH --nodes=(\d+)", text, flags=re.M)
    return per_node * (int(nodes.group(1)) if nodes else 1)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_flags_make_a_valid_layout(script):
    flags = pretrain_flags(script)
    assert "--preset" in flags, flags  # found the command line
    config = parse_args(flags)
    dims = ParallelDims.from_config(config.parallel, world_size(script), config.model, config.data.seq_length)
    assert dims.validate(config.model, config.data) >= 1  # micro-batches per step; raises on a bad layout
