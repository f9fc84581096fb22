"""Multi-node preprocessing: n jobs (--shard-index/--num-shards or a SLURM array) each write
their parts, --merge joins them: byte for byte one run over all shards; a killed job is
resumed; a merge with a part missing is refused naming it."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_emu.data.indexed import MultimodalIndexed
from megatron_emu.data.preprocess import Shard, assigned_shards
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import preprocess_data  # noqa: E402

NUM_FILES = 7  # not a multiple of 3: jobs get 3, 2 and 2 files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


@pytest.fixture
def inputs(tmp_path):
    """NUM_FILES JSONL shards of 2 pairs each: PNG and JPEG images of several sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for f in range(NUM_FILES):
        lines = []
        for k in range(2):
            image = tmp_path / f"img{f}_{k}.{'jpg' if k else 'png'}"
            Image.fromarray(rng.integers(0, 256, (60 + 10 * f, 80, 3), dtype=np.uint8)).save(image)
            lines.append({"image": str(image), "caption": f"picture {k} of file {f}"})
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("\n".join(json.dumps(x) for x in lines))
        paths.append(str(path))
    return paths


def run(tok, inputs, prefix, *args):
    return preprocess_data.main(["--input-type", "pairs", "--input", *inputs, "--output-prefix", str(prefix),
                                 "--tokenizer-model", tok.model_path, "--no-progress", *map(str, args)])


def same_dataset(a, b) -> None:
    for ext in (".bin", ".idx"):
        assert open(f"{a}{ext}", "rb").read() == open(f"{b}{ext}", "rb").read(), ext
    assert json.load(open(f"{a}.json")) == json.load(open(f"{b}.json"))


def test_three_jobs_merged_equal_one_run_byte_for_byte(tok, tmp_path, inputs):
    one = run(tok, inputs, tmp_path / "one/d")
    for i in range(3):
        job = run(tok, inputs, tmp_path / "three/d", "--shard-index", i, "--num-shards", 3)
        assert job["shards"] == len(range(i, NUM_FILES, 3))
        assert not os.path.exists(tmp_path / "three/d.bin")  # a job merges nothing
    merged = run(tok, inputs, tmp_path / "three/d", "--merge")
    same_dataset(tmp_path / "one/d", tmp_path / "three/d")
    assert merged["documents_out"] == one["documents_out"] == 2 * NUM_FILES
    assert not os.path.exists(tmp_path / "three/d.parts")  # removed after the merge (--keep-parts keeps them)
    assert MultimodalIndexed(str(tmp_path / "three/d")).image_format == "jpeg"  # the default for web inputs


def test_killed_job_resumes_and_a_merge_before_that_is_refused(tok, tmp_path, inputs):
    for i in range(3):
        run(tok, inputs, tmp_path / "d", "--shard-index", i, "--num-shards", 3)
    # Job 1 killed while writing its second part (input 4): the .bin half written, no .json.
    part = tmp_path / "d.parts/00004"
    os.remove(f"{part}.json")
    with open(f"{part}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{part}.bin") // 2)
    first_part = tmp_path / "d.parts/00001.bin"
    before = os.stat(first_part).st_mtime_ns
    with pytest.raises(ValueError, match=r"d\.parts: 1 of 7 parts missing, incomplete .*part4\.jsonl \(part 00004\)"):
        run(tok, inputs, tmp_path / "d", "--merge")
    resumed = run(tok, inputs, tmp_path / "d", "--shard-index", 1, "--num-shards", 3, "--resume")
    assert resumed["shards_resumed"] == 1 and os.stat(first_part).st_mtime_ns == before  # only input 4 redone
    run(tok, inputs, tmp_path / "d", "--merge")
    run(tok, inputs, tmp_path / "single/d")
    same_dataset(tmp_path / "single/d", tmp_path / "d")


def test_a_part_changed_after_it_was_written_is_refused_at_merge(tok, tmp_path, inputs):
    run(tok, inputs[:2], tmp_path / "d", "--shard-index", 0, "--num-shards", 2)
    run(tok, inputs[:2], tmp_path / "d", "--shard-index", 1, "--num-shards", 2)
    with open(tmp_path / "d.parts/00001.bin", "r+b") as f:
        f.seek(5)
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"00001\.bin: checksum xxh3_64 .*corrupted since it was written"):
        run(tok, inputs[:2], tmp_path / "d", "--merge")


def test_slurm_array_variables_give_the_job(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")  # --array=4-6: the third task of three
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    base = ["--input-type", "pairs", "--output-prefix", "x"]
    args = preprocess_data.parse_args(base)
    assert (args.shard_index, args.num_shards) == (2, 3)
    assert (preprocess_data.parse_args([*base, "--shard-index", "0"]).shard_index) == 0  # a flag wins
    merge = preprocess_data.parse_args([*base, "--merge"])
    assert (merge.shard_index, merge.num_shards) == (0, 1)
    with pytest.raises(ValueError, match="--shard-index 3 is outside"):
        preprocess_data.parse_args([*base, "--shard-index", "3"])


def test_assignment_is_round_robin_and_covers_every_shard_once():
    shards = [Shard(i, "pairs", f"f{i}", f"f{i}") for i in range(10)]
    jobs = [assigned_shards(shards, i, 4) for i in range(4)]
    assert [[s.index for s in j] for j in jobs] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


SBATCH = os.path.join(ROOT, "examples/slurm/preprocess_pairs.sbatch")


def sbatch_commands(tmp_path, env: dict) -> list[list[str]]:
    """The python command lines the example script runs under `env`, recorded by a
    `python` shim on PATH (bash runs the script verbatim: its variables, quoting, branches)."""
    import subprocess

    bindir, record = tmp_path / "bin", tmp_path / "commands.jsonl"
    bindir.mkdir(exist_ok=True)
    (bindir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, os, sys; "
                                   "open(os.environ[\"RECORD\"], \"a\").write(json.dumps(sys.argv[1:]) + chr(10))' \"$@\"\n")
    (bindir / "python").chmod(0o755)
    record.unlink(missing_ok=True)
    env = dict(os.environ, **env, PATH=f"{bindir}:{os.environ['PATH']}", RECORD=str(record),
               SLURM_SUBMIT_DIR=str(tmp_path), SLURM_CPUS_PER_TASK="1")
    subprocess.run(["bash", SBATCH], env=env, check=True)
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_the_sbatch_example_runs_as_an_array_then_merges(tok, tmp_path, inputs, monkeypatch, capsys):
    """The example's own command lines: 3 array tasks, then the merge job, == one run."""
    import validate_data

    paths = dict(INPUT=str(tmp_path / "part*.jsonl"), OUT=str(tmp_path / "out/d"), TOKENIZER=tok.model_path)
    for task in range(3):
        array = dict(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="3")
        [command] = sbatch_commands(tmp_path, dict(paths, **array))
        assert command[0] == "tools/preprocess_data.py" and "--resume" in command
        for name, value in array.items():
            monkeypatch.setenv(name, value)
        assert preprocess_data.main(command[1:])["shards"] == len(range(task, NUM_FILES, 3))
    for name in array:
        monkeypatch.delenv(name)
    merge, validate = sbatch_commands(tmp_path, dict(paths, MERGE="1"))
    assert merge[0] == "tools/preprocess_data.py" and validate[0] == "tools/validate_data.py"
    preprocess_data.main(merge[1:])
    assert validate_data.main(validate[1:]) == 0
    run(tok, inputs, tmp_path / "single/d")
    same_dataset(tmp_path / "single/d", tmp_path / "out/d")
