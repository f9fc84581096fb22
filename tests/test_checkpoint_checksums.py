"""Checksummed checkpoints: every file (and every DCP item) is hashed as it is written;
--load refuses changed bytes naming the file and the tensor, before any weight is touched.
Faults are injected into real saves: bytes overwritten inside a tensor, a truncated
shard, a lost checksums.json; sync, async and 2-rank saves record every file."""

import json
import logging
import os

import pytest
import torch

from megatron_emu.arguments import parse_args
from megatron_emu.training.checkpoint import Checkpointer
from megatron_emu.training.checkpoint_files import iteration_dir
from megatron_emu.training.checksums import CHECKSUMS_NAME, read_checksums, verify_file
from tests.dist_utils import spawn
from tests.test_checkpoint import _saved_run, build


def corrupt_tensor(directory: str, key: str = "model.llm.output.weight", shard: str | None = None) -> tuple[str, str]:
    """Overwrite 64 bytes in the middle of `key`'s item with different bytes: (file, key)."""
    record = read_checksums(directory)
    name, item = next((n, i) for n, f in sorted(record["files"].items()) for i in f.get("items", [])
                      if i["key"] == key and (shard is None or n == shard))
    path = os.path.join(directory, name)
    with open(path, "r+b") as f:
        f.seek(item["offset"] + item["length"] // 2)
        old = f.read(64)
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in old))
    return name, key


def saved_checkpoint(tmp_path, **flags):
    config, parts = _saved_run(tmp_path, **flags)
    checkpointer = Checkpointer(config.checkpoint, config)
    checkpointer.save(1, *parts)
    checkpointer.wait()
    return config, iteration_dir(str(tmp_path), 1)


def assert_records_every_file(directory: str) -> dict:
    record = read_checksums(directory)
    on_disk = sorted(n for n in os.listdir(directory) if n != CHECKSUMS_NAME)
    assert sorted(record["files"]) == on_disk
    assert {".metadata", "run_config.json"} <= set(on_disk)
    for name, entry in record["files"].items():
        verify_file(directory, name, entry)  # raises on any difference
        if name.endswith(".distcp"):  # the items tile the shard: each byte is in one item
            ends = [(i["offset"], i["offset"] + i["length"]) for i in entry["items"]]
            assert ends[0][0] == 0 and ends[-1][1] == entry["size"]
            assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    return record


@pytest.mark.parametrize("flags", [{}, {"async_save": True}], ids=["sync", "async"])
def test_a_save_records_every_file_and_item(tmp_path, flags):
    _, directory = saved_checkpoint(tmp_path, **flags)
    record = assert_records_every_file(directory)
    keys = {i["key"] for f in record["files"].values() for i in f.get("items", [])}
    assert "model.llm.output.weight" in keys and any(k.startswith("optim.state.") for k in keys)


def test_load_refuses_a_changed_tensor_naming_file_and_tensor(tmp_path):
    config, directory = saved_checkpoint(tmp_path)
    name, key = corrupt_tensor(directory)
    model, optimizer, scheduler, loader = build(config, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        Checkpointer(config.checkpoint, config).load(model, optimizer, scheduler, loader)
    message = str(error.value)
    assert "\n" not in message
    assert f"{os.path.join(directory, name)}: checksum mismatch in tensor {key}" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_no_verify_checkpoint_skips_the_check(tmp_path):
    assert parse_args(["--no-verify-checkpoint"]).checkpoint.verify is False
    assert parse_args([]).checkpoint.verify is True
    config, directory = saved_checkpoint(tmp_path)
    corrupt_tensor(directory)
    config.checkpoint.verify = False
    state = Checkpointer(config.checkpoint, config).load(*build(config, seed=5))
    assert state.iteration == 1  # the changed bytes went in unnoticed: what the flag risks


def test_a_truncated_shard_is_named_with_its_sizes(tmp_path):
    config, directory = saved_checkpoint(tmp_path)
    path = os.path.join(directory, "__0_0.distcp")
    size = os.path.getsize(path)
    os.truncate(path, size - 100)
    with pytest.raises(ValueError, match=f"{path}: {size - 100} bytes, checksums.json records {size}"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=5))


def test_a_changed_run_config_is_named(tmp_path):
    config, directory = saved_checkpoint(tmp_path)
    path = os.path.join(directory, "run_config.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"iteration": 1', '"iteration": 7'))
    with pytest.raises(ValueError, match=f"{path}: checksum mismatch: the checkpoint is corrupted"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=5))


def test_without_checksums_it_warns_and_loads(tmp_path, caplog):
    config, directory = saved_checkpoint(tmp_path)
    os.remove(os.path.join(directory, CHECKSUMS_NAME))
    model, *rest = build(config, seed=5)
    with caplog.at_level(logging.WARNING, logger="megatron_emu"):
        state = Checkpointer(config.checkpoint, config).load(model, *rest)
    assert state.iteration == 1
    assert f"{directory}: no checksums.json" in caplog.text and "not verified" in caplog.text


def test_a_malformed_checksum_record_is_named(tmp_path):
    config, directory = saved_checkpoint(tmp_path)
    path = os.path.join(directory, CHECKSUMS_NAME)
    open(path, "w").write(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=f"{path}: format 'something else'"):
        Checkpointer(config.checkpoint, config).load(*build(config, seed=5))


# ---------------------------------------------------------------------------
# Two ranks: both shards recorded by rank 0; a bad shard fails the load on every rank
# ---------------------------------------------------------------------------
def two_rank_worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist

    from megatron_emu.config import CheckpointConfig
    from megatron_emu.training.checkpoint import Layout
    from tests.test_reshard import build_run, train

    for name, flags in (("sync", {}), ("async", {"async_save": True})):
        run = build_run({"data_parallel_sharding": "fsdp"}, world)
        train(run, [0])
        save = os.path.join(root, name)
        checkpointer = Checkpointer(CheckpointConfig(save=save, **flags), run[0], Layout.from_mesh(run[1].pmesh))
        checkpointer.save(1, run[1].parts, run[2])
        checkpointer.wait()
        dist.barrier()
    directory = iteration_dir(os.path.join(root, "sync"), 1)
    if rank == 0:
        corrupt_tensor(directory, key="model.llm.output.weight", shard="__1_0.distcp")
    dist.barrier()
    run = build_run({"data_parallel_sharding": "fsdp"}, world)
    loader = Checkpointer(CheckpointConfig(load=os.path.join(root, "sync")), run[0], Layout.from_mesh(run[1].pmesh))
    with pytest.raises(ValueError, match=r"__1_0\.distcp: checksum mismatch in tensor model\.llm\.output\.weight \(chunk at"):
        loader.load(run[1].parts, run[2])


def test_two_rank_saves_record_both_shards_and_every_rank_refuses_a_bad_one(tmp_path):
    spawn(2, two_rank_worker, str(tmp_path))
    for name in ("sync", "async"):
        directory = iteration_dir(str(tmp_path / name), 1)
        if name == "sync":  # rank 0 changed rank 1's shard in the spawn: restore nothing, check the rest
            record = read_checksums(directory)
            verify_file(directory, "__0_0.distcp", record["files"]["__0_0.distcp"])
            assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "run_config.json"} == set(record["files"])
        else:
            record = assert_records_every_file(directory)
            assert {"__0_0.distcp", "__1_0.distcp"} <= set(record["files"])
