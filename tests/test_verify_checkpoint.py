"""The exporter and tools/verify_checkpoint.py check a checkpoint's bytes against its
checksums.json: 64 bytes overwritten inside a tensor are refused naming file and tensor,
whichever way the bytes are read (O_DIRECT spans, mapped items, the dcp.load fallback)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_emu.convert.export import export_hf
from megatron_emu.convert.streams import DCPSource, SafetensorsSource
from megatron_emu.data.tokenizer import build_tiny_tokenizer
from megatron_emu.training.checkpoint_files import iteration_dir
from megatron_emu.training.checksums import CHECKSUMS_NAME
from tests.test_checkpoint_checksums import assert_records_every_file, corrupt_tensor, saved_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSOR = "model.llm.output.weight"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A --save root with iterations 1 and 2 (2 is latest), saved by the Checkpointer."""
    root = tmp_path_factory.mktemp("saved")
    saved_checkpoint(root)
    shutil.copytree(iteration_dir(str(root), 1), iteration_dir(str(root), 2))
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return root


@pytest.fixture
def corrupted(intact, tmp_path):
    """A copy of the intact root with 64 bytes of llm.output.weight changed in iteration 2."""
    root = tmp_path / "ckpt"
    shutil.copytree(intact, root)
    name, _ = corrupt_tensor(iteration_dir(str(root), 2), TENSOR)
    return root, os.path.join(iteration_dir(str(root), 2), name)


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "verify_checkpoint.py"), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_verify_checkpoint_passes_an_intact_checkpoint(intact):
    result = verify(str(intact), "--all")
    assert result.returncode == 0, result.stderr
    assert "2 checkpoint(s) verified, 0 corrupted" in result.stdout


def test_verify_checkpoint_names_the_file_and_tensor(corrupted):
    root, path = corrupted
    result = verify(str(root))  # the root: its latest, iteration 2
    assert result.returncode == 1
    assert f"error: {path}: checksum mismatch in tensor {TENSOR} (bytes" in result.stderr
    assert verify(iteration_dir(str(root), 1)).returncode == 0  # the other iteration is intact
    assert verify(str(root), "--all").returncode == 1


def test_verify_checkpoint_names_a_truncated_file_and_refuses_a_non_checkpoint(intact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(iteration_dir(str(intact), 1), copy)
    os.truncate(copy / ".metadata", 10)
    result = verify(str(copy))
    assert result.returncode == 1 and f"{copy / '.metadata'}: 10 bytes, checksums.json records" in result.stderr
    result = verify(str(tmp_path / "nothing"))
    assert result.returncode == 2 and "not a checkpoint" in result.stderr


def test_verify_checkpoint_passes_a_checkpoint_without_checksums_with_a_warning(intact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(iteration_dir(str(intact), 1), copy)
    os.remove(copy / CHECKSUMS_NAME)
    result = verify(str(copy))
    assert result.returncode == 0 and "no checksums.json" in result.stdout and "1 without checksums" in result.stdout


def test_export_of_an_intact_checkpoint_equals_its_tensors(intact, tmp_path):
    out = tmp_path / "hf"
    export_hf(str(intact), str(out), build_tiny_tokenizer(), max_shard_bytes=400_000)
    exported = SafetensorsSource(str(out / "visual")).get("visual.cls_token")
    assert torch.equal(exported, DCPSource(str(intact)).read(["visual.cls_token"])["visual.cls_token"])


def test_export_refuses_a_changed_tensor_and_writes_nothing(corrupted, tmp_path):
    root, path = corrupted
    out = tmp_path / "hf"
    with pytest.raises(ValueError) as error:
        export_hf(str(root), str(out), build_tiny_tokenizer(), max_shard_bytes=400_000)
    assert str(error.value).startswith(f"{path}: checksum mismatch in tensor {TENSOR} (bytes")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".hf")]


@pytest.mark.parametrize("how", ["span cast to bf16", "mapped", "dcp.load"])
def test_every_read_path_of_the_exporter_verifies(corrupted, how):
    root, path = corrupted
    source, name = DCPSource(str(root)), TENSOR[len("model."):]
    with pytest.raises(ValueError, match=f"{path}: checksum mismatch in tensor {TENSOR}"):
        if how == "span cast to bf16":
            source.read([name], spans=True)[name].tensor()
        else:
            source.read([name], direct=how == "mapped")
    assert source.read(["visual.cls_token"], direct=how == "mapped")  # an intact tensor still reads


def test_export_warns_without_checksums_and_still_exports(intact, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(iteration_dir(str(intact), 1), copy)
    os.remove(copy / CHECKSUMS_NAME)
    export_hf(str(copy), str(tmp_path / "hf"), build_tiny_tokenizer())
    assert "no checksums.json" in caplog.text and (tmp_path / "hf" / "config.json").exists()


def test_an_imported_checkpoint_records_checksums_as_it_is_written(tmp_path):
    from megatron_emu.config import get_preset
    from megatron_emu.convert.imports import import_checkpoint

    import_checkpoint([], get_preset("tiny"), str(tmp_path / "imported"), seed=0, max_shard_bytes=2**20)  # several groups
    directory = iteration_dir(str(tmp_path / "imported"), 0)
    record = assert_records_every_file(directory)
    assert sum(n.endswith(".distcp") for n in record["files"]) > 1
    name, _ = corrupt_tensor(directory, TENSOR)
    result = verify(str(tmp_path / "imported"))
    assert result.returncode == 1
    assert f"{os.path.join(directory, name)}: checksum mismatch in tensor {TENSOR}" in result.stderr
