"""Sharded save / resume with torch.distributed.checkpoint (DCP), Megatron layout.

    DIR/latest_checkpointed_iteration.txt   "100", replaced atomically after a complete save
    DIR/iter_0000100/                       DCP files (.metadata, __R_0.distcp) + run_config.json
                                            + checksums.json (xxh3_64 of every file and tensor)
    DIR/iter_0000100.tmp/                   a save in progress (never loaded; swept on the next save)

Refused with one clear error (training/failsafe.py holds the checks): a save from NaN/inf
parameters or optimizer states, a save that would move `latest` backwards, and a --load
without a checkpoint (except the run's own, still empty --save: a requeued job's first run).
A save that fails (disk full) removes its partial directory and leaves `latest` as it was.

Every rank writes its own shards; rank 0 renames the finished directory and then
replaces `latest` (temp file + os.replace), so a save killed at any moment leaves the
previous `latest` loadable. Model and optimizer state are keyed by fully-qualified
parameter names (`get_model_state_dict`; `state.<fqn>.exp_avg` for the optimizer), which
is what lets a checkpoint saved at one TP/PP/DP layout load at another: DCP reshards
plain tensors, DTensors (TP, FSDP2) and pipeline stages alike. What cannot be
resharded is per-rank state (RNG, data-loader position): it is restored only when
the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)

from megatron_emu.config import CheckpointConfig
from megatron_emu.model.lora import is_lora_parameter
from megatron_emu.training.checksum_writer import ChecksummingWriter
from megatron_emu.training.checksums import verify_for_load
from megatron_emu.training.checkpoint_files import (
    LATEST_NAME,
    RUN_CONFIG_NAME,
    check_model_config,
    check_shards,
    check_state_keys,
    list_iterations,
    read_latest,
    read_run_config,
    iteration_dir,
    write_latest,
)
from megatron_emu.training.checkpoint_state import (
    as_list,
    model_state,
    optimizer_state,
    rng_state,
    set_optimizer_hyperparameters,
    set_rng_state,
)
from megatron_emu.training.checkpoint_guard import disk_full, no_checkpoint_message, sweep_interrupted_saves
from megatron_emu.training.failsafe import RunStopped, agree_count, nonfinite_state
from megatron_emu.training.pretrained import base_identity, check_same_base

log = logging.getLogger("megatron_emu")

# One process saves and loads without a process group, as intended: DCP would say so at every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Layout:
    """Where this process sits; recorded so per-rank state is restored only onto the same layout."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dp_rank: int = 0

    @classmethod
    def single(cls) -> "Layout":
        return cls()

    @classmethod
    def from_mesh(cls, pmesh) -> "Layout":
        """From a megatron_emu.parallel ParallelMesh (one process: a mesh of size 1)."""
        d = pmesh.dims
        return cls(rank=dist.get_rank(), world_size=d.world_size, tp=d.tp, pp=d.pp, dp=d.dp, dp_rank=pmesh.dp_rank)


@dataclass
class TrainState:
    """Progress restored by `load`: where the loop resumes."""

    iteration: int = 0
    consumed_samples: int = 0


def _rank_key(layout: Layout) -> str:
    return f"rank_state.{layout.rank}"


def _loader_key(layout: Layout) -> str:
    # Ranks of one data-parallel replica (TP/PP peers) read the same samples: one copy.
    return f"loader_state.dp{layout.dp_rank}"


# ---------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------
class Checkpointer:
    """Saves every `save_interval` iterations into `config.save`, loads from `config.load`.

    `run_config` is the run's TrainConfig (a dataclass); it is stored as JSON and its
    `model` section must match on load. `process_group`: the group DCP coordinates on;
    default: a dedicated gloo group, so async saves never interleave with training
    collectives and CPU state can be gathered even when training runs on NCCL.
    """

    def __init__(self, config: CheckpointConfig, run_config, layout: Layout | None = None, process_group=None):
        self.config = config
        self.run_config = run_config
        self.layout = layout or Layout.single()
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and process_group is None:
            process_group = dist.new_group(backend="gloo")
        self.process_group = process_group
        self._pending = None  # (future, iteration) of an async save in flight

    # -- instruction tuning: adapters only, on top of a recorded base -------------
    def _adapters_only(self) -> bool:
        lora = getattr(self.run_config, "lora", None)
        return lora is not None and lora.enabled

    def _model_state(self, models) -> dict[str, Any]:
        state = model_state(models)
        if self._adapters_only():  # the frozen base is --pretrained-checkpoint's
            state = {k: v for k, v in state.items() if is_lora_parameter(k)}
        return state

    def _base_identity(self) -> dict | None:
        path = self.config.pretrained_checkpoint
        return base_identity(path) if self._adapters_only() and path else None

    # -- saving -----------------------------------------------------------------
    def should_save(self, iteration: int) -> bool:
        c = self.config
        return bool(c.save) and c.save_interval > 0 and iteration % c.save_interval == 0

    def save(self, iteration: int, models, optimizer, scheduler=None, loader=None, consumed_samples: int = 0) -> None:
        """Write iteration `iteration`; with --async-save return once the state is staged."""
        self.wait()  # one save in flight at a time
        root = self.config.save
        self.refuse_rewind(iteration)
        state = self._state_to_save(models, optimizer, scheduler, loader, iteration, consumed_samples)
        self._refuse_nonfinite(state, iteration)
        tmp = iteration_dir(root, iteration) + ".tmp"
        setup_error = None
        if self.layout.rank == 0:
            try:
                with self._cleanup_on_failure(iteration):
                    os.makedirs(root, exist_ok=True)
                    sweep_interrupted_saves(root)  # leftovers of a killed save: `.tmp` dirs, latest's temp files
                    os.makedirs(tmp)
                    self._write_run_config(tmp, iteration, consumed_samples)
            except Exception as e:
                setup_error = e
        # Also the barrier: the clean tmp dir exists before anyone writes into it. A failure
        # on rank 0 stops every rank here instead of leaving them waiting in DCP.
        if agree_count(int(setup_error is not None), self.process_group):
            raise setup_error or RunStopped(f"rank 0 could not prepare {tmp} (its log says why); latest unchanged")

        writer = ChecksummingWriter(tmp, thread_count=self.config.save_threads)  # + checksums.json
        if self.config.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.process_group)
            self._pending = (future, iteration)
        else:
            with self._cleanup_on_failure(iteration):
                dcp.save(state, storage_writer=writer, process_group=self.process_group)
                self._finalize(iteration)
            self._barrier()  # every rank returns with the new `latest` in place

    def refuse_rewind(self, iteration: int, starting: bool = False) -> None:
        """`latest` never moves backwards unless --allow-checkpoint-rewind: every rank reads it
        (one small file) and refuses alike."""
        root = self.config.save
        latest = read_latest(root) if root and os.path.isdir(root) else None
        if latest is None or latest <= iteration or self.config.allow_checkpoint_rewind:
            return
        what = f"this run starts at iteration {iteration}" if starting else f"saving iteration {iteration}"
        raise ValueError(f"--save {root} holds iteration {latest} ({LATEST_NAME}); {what} would move it backwards: "
                         f"resume it with --load {root}, choose another --save, or pass --allow-checkpoint-rewind")

    def _refuse_nonfinite(self, state: dict, iteration: int) -> None:
        """Never save NaN/inf parameters or optimizer states: refuse on every rank alike, keep `latest`."""
        bad = nonfinite_state({**{f"model.{k}": v for k, v in state["model"].items()},
                               **{f"optim.{k}": v for k, v in state["optim"].items()}})
        total = agree_count(len(bad), self.process_group)
        if total:
            latest = read_latest(self.config.save) if os.path.isdir(self.config.save) else None
            here = f"; on this rank e.g. {', '.join(bad[:2])}" if bad else ""
            raise RunStopped(f"refusing to save iteration {iteration} to {self.config.save}: {total} tensors hold NaN/inf"
                             f"{here}; latest stays at iteration {latest}")

    @contextlib.contextmanager
    def _cleanup_on_failure(self, iteration: int):
        """A failed save leaves no partial directory and `latest` as it was; a full device says so."""
        try:
            yield
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            root = self.config.save
            tmp = iteration_dir(root, iteration) + ".tmp"
            if self.layout.rank == 0 and os.path.isdir(root):
                shutil.rmtree(tmp, ignore_errors=True)
                sweep_interrupted_saves(root)
            if not disk_full(e, root):
                raise
            latest = read_latest(root) if os.path.isdir(root) else None
            raise OSError(errno.ENOSPC, f"cannot save iteration {iteration}: no space left on the device holding "
                          f"{root}; removed the partial save {tmp}, latest stays at iteration {latest}") from None

    def wait(self) -> None:
        """Block until an async save has finished and is published as `latest`."""
        if self._pending is not None:
            future, iteration = self._pending
            self._pending = None
            with self._cleanup_on_failure(iteration):
                future.result()
                self._finalize(iteration)

    def poll(self) -> None:
        """Publish a finished async save without blocking (call once per iteration)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def _state_to_save(self, models, optimizer, scheduler, loader, iteration, consumed_samples) -> dict:
        common = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "layout": dataclasses.asdict(self.layout),
        }
        state = {
            "model": self._model_state(models),
            "optim": optimizer_state(models, optimizer),
            "common": pickle.dumps(common),
            _rank_key(self.layout): pickle.dumps({"rng": rng_state()}),
        }
        if loader is not None and hasattr(loader, "state_dict"):
            state[_loader_key(self.layout)] = pickle.dumps(loader.state_dict())
        return state

    def _write_run_config(self, directory: str, iteration: int, consumed_samples: int) -> None:
        record = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
            "torch_version": torch.__version__,
            "config": dataclasses.asdict(self.run_config),
            "pretrained_checkpoint": self._base_identity(),  # instruction tuning: what the adapters adapt
        }
        with open(os.path.join(directory, RUN_CONFIG_NAME), "w") as f:
            json.dump(record, f, indent=2)

    def _finalize(self, iteration: int) -> None:
        """Rank 0, after all shards and DCP's .metadata are written: rename, publish, prune.

        DCP writes .metadata only after gathering every rank's write results, so once
        rank 0's save has returned the directory is complete.
        """
        if self.layout.rank != 0:
            return
        root = self.config.save
        final = iteration_dir(root, iteration)
        if os.path.exists(final):  # re-saving an iteration: replace the old copy
            shutil.rmtree(final)
        os.rename(final + ".tmp", final)
        write_latest(root, iteration)
        log.info("saved checkpoint %s", final)
        self._prune(root, keep=self.config.keep_last, current=iteration)

    def _prune(self, root: str, keep: int, current: int) -> None:
        """Keep the newest `keep` iterations and always `current`, the one `latest` names (a
        checkpoint is saved only from finite state, so the newest saved is the newest good one)."""
        if keep <= 0:
            return
        for old in list_iterations(root)[:-keep]:
            if old != current:
                shutil.rmtree(iteration_dir(root, old), ignore_errors=True)

    # -- loading ----------------------------------------------------------------
    def resolve_load_dir(self) -> str | None:
        """The iteration directory to load, or None to start from scratch, which only the run's
        own --save may do while it holds no checkpoint at all (a requeued job's first run)."""
        root = self.config.load
        if not root:
            return None
        if os.path.exists(os.path.join(root, ".metadata")):  # an iteration directory itself
            return root
        iteration = read_latest(root) if os.path.isdir(root) else None
        if iteration is None:
            own_save = bool(self.config.save) and os.path.realpath(root) == os.path.realpath(self.config.save)
            if own_save and not list_iterations(root):
                log.info("--load %s is this run's --save and holds no checkpoint yet: starting from scratch", root)
                return None
            raise ValueError(no_checkpoint_message(root, own_save))
        directory = iteration_dir(root, iteration)
        if not os.path.isdir(directory):
            raise ValueError(f"{root}: latest_checkpointed_iteration.txt names iteration {iteration} but {directory} is missing")
        return directory

    def load(self, models, optimizer, scheduler=None, loader=None) -> TrainState:
        """Restore what the flags ask for; returns where the loop resumes (0 with --finetune)."""
        directory = self.resolve_load_dir()
        if directory is None:
            return TrainState()
        c = self.config
        if c.verify:
            verify_for_load(directory, self.process_group)
        record = read_run_config(directory)
        check_model_config(directory, record["config"]["model"], dataclasses.asdict(self.run_config.model))
        check_same_base(directory, record.get("pretrained_checkpoint"), self._base_identity())
        metadata = dcp.FileSystemReader(directory).read_metadata()
        check_shards(directory, metadata)

        load_optim = not (c.finetune or c.no_load_optim)
        state: dict[str, Any] = {"model": self._model_state(models)}
        if load_optim:
            state["optim"] = optimizer_state(models, optimizer)
        check_state_keys(directory, metadata, state, record.get("layout", {}), self.layout)
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), process_group=self.process_group)
        for model in as_list(models):
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        if load_optim:
            set_optimizer_hyperparameters(models, optimizer, state["optim"])
        log.info("loaded checkpoint %s (model%s)", directory, ", optimizer" if load_optim else "")
        if c.finetune:
            return TrainState()
        return self._load_progress(directory, metadata, record, scheduler, loader, load_optim)

    def _load_progress(self, directory, metadata, record, scheduler, loader, load_optim) -> TrainState:
        extras = {"common": b""}
        saved = record.get("layout", {})
        same_layout = saved == {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}
        keys = metadata.state_dict_metadata
        rank_key, loader_key = _rank_key(self.layout), _loader_key(self.layout)
        if same_layout and not self.config.no_load_rng and rank_key in keys:
            extras[rank_key] = b""
        if same_layout and loader is not None and hasattr(loader, "load_state_dict") and loader_key in keys:
            extras[loader_key] = b""
        dcp.load(extras, storage_reader=dcp.FileSystemReader(directory), process_group=self.process_group)
        common = pickle.loads(extras["common"])
        if load_optim and scheduler is not None and common["scheduler"] is not None:
            scheduler.load_state_dict(common["scheduler"])
        if rank_key in extras:
            set_rng_state(pickle.loads(extras[rank_key])["rng"])
        if loader_key in extras:
            loader.load_state_dict(pickle.loads(extras[loader_key]))
        elif not same_layout:
            log.warning("checkpoint layout %s differs from this run's: RNG and data-loader positions are not restored", saved)
        return TrainState(common["iteration"], common["consumed_samples"])

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.process_group)
