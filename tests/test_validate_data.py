"""tools/validate_data.py with faults injected: each bad document named (prefix, document,
sequence, problem), each bad file named, exit code 1; a clean dataset exits 0."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from tests.test_data_formats import corrupt_first_image, overwrite_first_token, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import validate_data  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


def validate(tok, capsys, *prefixes, workers=1):
    code = validate_data.main([*prefixes, "--tokenizer-model", tok.model_path, "--workers", str(workers),
                               "--no-progress"])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, [x for x in lines if not x.startswith("{")], [json.loads(x) for x in lines if x.startswith("{")]


def test_clean_datasets_pass(tok, tmp_path, capsys):
    pairs = synthetic(tok, tmp_path / "p", "jpeg", n=6)
    video = synthetic(tok, tmp_path / "v", "raw", n=2, kind="video")
    code, problems, summaries = validate(tok, capsys, pairs, video, workers=2)
    assert (code, problems) == (0, [])
    assert [s["ok"] for s in summaries] == [True, True] and summaries[0]["documents"] == 6


def test_flipped_bytes_name_each_bad_document_and_sequence(tok, tmp_path, capsys):
    prefix = synthetic(tok, tmp_path / "p", "jpeg", n=600)  # > one task of 256 documents: several workers
    bad_token = overwrite_first_token(prefix, 1)
    bad_image = corrupt_first_image(prefix, 590)
    code, problems, summaries = validate(tok, capsys, prefix, workers=2)
    assert code == 1
    assert problems[0].startswith(f"{prefix}.bin: checksum xxh3_64 ")
    assert problems[1] == (f"{prefix}: document 1, sequence {bad_token}: token id 65535 at position 0 is outside "
                           f"the vocabulary of {tok.base_vocab_size} (1 such ids)")
    assert problems[2].startswith(f"{prefix}: document 590, sequence {bad_image}: corrupt JPEG")
    assert len(problems) == 3 and summaries[0]["bad_documents"] == 2


def test_same_size_idx_of_another_dataset_and_truncated_files(tok, tmp_path, capsys):
    a = synthetic(tok, tmp_path / "a", "jpeg", seed=0)
    b = synthetic(tok, tmp_path / "b", "jpeg", seed=1)
    c = synthetic(tok, tmp_path / "c", "raw", seed=2)
    shutil.copy(b + ".idx", a + ".idx")
    with open(c + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(c + ".bin") - 10)
    code, problems, _ = validate(tok, capsys, a, b, c)
    assert code == 1 and len(problems) == 2
    assert problems[0].startswith(f"{a}.idx: checksum xxh3_64 ") and "another dataset" in problems[0]
    assert problems[1].startswith(f"{c}.bin: has ") and "truncated" in problems[1]


def test_flipped_raw_pixel_is_caught_by_the_checksum_alone(tok, tmp_path, capsys):
    prefix = synthetic(tok, tmp_path / "r", "raw")
    with open(prefix + ".bin", "r+b") as f:
        f.seek(os.path.getsize(prefix + ".bin") // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, problems, _ = validate(tok, capsys, prefix)
    assert code == 1 and problems[0].startswith(f"{prefix}.bin: checksum")
    assert problems[1] == (f"{prefix}.bin: no document shows the change: the changed bytes are valid pixel or "
                           "token values")


def test_cli_exit_code_and_lines(tok, tmp_path):
    prefix = synthetic(tok, tmp_path / "p", "jpeg")
    overwrite_first_token(prefix, 0)
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools/validate_data.py"), "--no-progress", prefix,
                          str(tmp_path / "nothing"), "--tokenizer-model", tok.model_path],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and f"{prefix}: document 0, sequence" in bad.stdout
    assert "nothing.json" in bad.stdout and "Traceback" not in bad.stderr


def test_without_tokenizer_model_only_a_tiny_tokenizer_dataset_is_accepted(tok, tmp_path, capsys, monkeypatch):
    prefix = synthetic(tok, tmp_path / "p", "jpeg")
    monkeypatch.setenv("MEGATRON_EMU_CACHE", os.path.dirname(tok.model_path))
    assert validate_data.main([prefix, "--no-progress"]) == 0
    meta = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps(dict(meta, tokenizer="0123456789abcdef")))
    with pytest.raises(ValueError, match=r"p\.json: written with tokenizer 0123456789abcdef, not the tiny one: "
                                         "give --tokenizer-model"):
        validate_data.main([prefix, "--no-progress"])
