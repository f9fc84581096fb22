"""One object owns the parallel layout: ParallelDims (sizes, validated once) and the
DeviceMesh (pp, dp, tp) built from it. Everything else receives them explicitly.

Every run has a mesh, one process included: alone, build_mesh starts a one-rank process
group (as TorchTitan runs under torchrun with one process), so the same collectives,
gradient clipping and checkpoint coordination run at every size.

Rank order is Megatron's: TP varies fastest (TP ranks share a node and its NVLink),
then DP, then PP (stage boundaries are the cheapest links to cross between nodes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_emu.config import DataConfig, ModelConfig, ParallelConfig
from megatron_emu.parallel.balance import StageCost, balanced_stage_layers, emu_stage_cost

log = logging.getLogger("megatron_emu")

SCHEDULES = ("1f1b", "interleaved", "zero-bubble")
SHARDINGS = ("ddp", "fsdp", "hsdp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of every parallel dimension; `validate` checks them against the model and batch."""

    world_size: int
    tp: int
    pp: int
    dp: int
    sharding: str  # ddp | fsdp | hsdp
    dp_replicate: int  # hsdp: replicas; ddp: dp; fsdp: 1
    sequence_parallel: bool
    schedule: str
    virtual_stages: int  # pipeline stages held by each PP rank
    stage_layers: tuple[int, ...]  # LLaMA layers of each pipeline stage (empty without PP)

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages if self.pp > 1 else 1

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int, model: ModelConfig,
                    seq_length: int | None = None) -> "ParallelDims":
        """`seq_length` (the run's --seq-length) is needed by --pipeline-balance auto only."""
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got TP={tp} PP={pp}")
        if world_size % (tp * pp):
            hint = f" (one process: start {tp * pp} or a multiple with torchrun --nproc-per-node)" if world_size == 1 else ""
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp}{hint}"
            )
        dp = world_size // (tp * pp)
        if parallel.sequence_parallel and tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if parallel.pipeline_schedule not in SCHEDULES:
            raise ValueError(f"--pipeline-schedule {parallel.pipeline_schedule!r}: choose one of {SCHEDULES}")
        sharding = parallel.data_parallel_sharding
        if sharding not in SHARDINGS:
            raise ValueError(f"--data-parallel-sharding {sharding!r}: choose one of {SHARDINGS}")
        replicas = {"ddp": dp, "fsdp": 1, "hsdp": parallel.num_distributed_optimizer_instances}[sharding]
        if replicas < 1 or dp % replicas:
            raise ValueError(
                f"--num-distributed-optimizer-instances {replicas} does not divide the data-parallel size {dp}"
            )
        cost = None
        if parallel.pipeline_balance_costs and not (parallel.pipeline_balance == "auto" and pp > 1):
            raise ValueError("--pipeline-balance-costs is read by --pipeline-balance auto with "
                             "--pipeline-model-parallel-size > 1 only")
        if parallel.pipeline_balance == "auto" and pp > 1:
            if seq_length is None:
                raise ValueError("--pipeline-balance auto needs the sequence length to cost the stages")
            cost = emu_stage_cost(model, seq_length, parallel.pipeline_balance_images_per_sample,
                                  parallel.pipeline_balance_costs)
        virtual, layers = pipeline_layout(parallel, model.llm.layers, cost) if pp > 1 else (1, ())
        return cls(world_size, tp, pp, dp, sharding, replicas, parallel.sequence_parallel,
                   parallel.pipeline_schedule, virtual, layers)

    def validate(self, model: ModelConfig, data: DataConfig) -> int:
        """Check heads, hidden sizes and batch against the layout; returns micro-batches per DP rank."""
        self.validate_model(model)
        if self.sequence_parallel and data.seq_length % self.tp:
            raise ValueError(f"--seq-length {data.seq_length} is not divisible by TP {self.tp} (--sequence-parallel)")
        g, m = data.global_batch_size, data.micro_batch_size
        if g % (m * self.dp):
            raise ValueError(f"--global-batch-size {g} is not divisible by --micro-batch-size {m} x data-parallel size {self.dp}")
        micro = g // (m * self.dp)
        if self.pp > 1 and micro < self.num_stages and self.schedule != "1f1b":
            raise ValueError(f"{micro} micro-batches per step is fewer than the {self.num_stages} pipeline stages "
                             f"that --pipeline-schedule {self.schedule} needs")
        if self.pp > 1 and micro < self.pp:
            raise ValueError(f"{micro} micro-batches per step is fewer than the {self.pp} pipeline ranks")
        return micro

    def validate_model(self, model: ModelConfig) -> None:
        """The model's sizes against the layout (all inference needs: it has no batch to check)."""
        llm = model.llm
        for name, value in (("LLaMA heads", llm.heads), ("LLaMA FFN", llm.ffn_dim)):
            if value % self.tp:
                raise ValueError(f"{name} {value} is not divisible by --tensor-model-parallel-size {self.tp}")
        if llm.padded_vocab_size % self.tp:
            raise ValueError(f"vocabulary size {llm.padded_vocab_size} is not divisible by --tensor-model-parallel-size "
                             f"{self.tp}: pad it with --make-vocab-size-divisible-by (e.g. 128)")

    def describe(self) -> str:
        dp = f"DP={self.dp} ({self.sharding}" + (f", {self.dp_replicate} replicas)" if self.sharding == "hsdp" else ")")
        text = f"TP={self.tp}{'+SP' if self.sequence_parallel else ''} PP={self.pp} {dp}"
        if self.pp > 1:
            text += f" | {self.schedule}, {self.num_stages} stages, LLaMA layers per stage {list(self.stage_layers)}"
        return text


def pipeline_layout(parallel: ParallelConfig, num_layers: int,
                    stage_cost: StageCost | None = None) -> tuple[int, tuple[int, ...]]:
    """(virtual stages per PP rank, LLaMA layers of each stage in order).

    --pipeline-balance auto places every layer by cost (`stage_cost`, parallel/balance.py).
    Otherwise --decoder-first/last-pipeline-num-layers fix the ends (Megatron) and the
    remaining layers are split evenly, either over the remaining stages or, with
    --num-layers-per-virtual-pipeline-stage K, into stages of K layers.
    """
    pp, k = parallel.pipeline_model_parallel_size, parallel.num_layers_per_virtual_pipeline_stage
    first, last = parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    ends = [n for n in (first, last) if n is not None]
    # zero-bubble runs the V schedule: two stages per rank.
    default_stages = 2 * pp if parallel.pipeline_schedule in ("interleaved", "zero-bubble") else pp
    if parallel.pipeline_balance == "auto":
        if ends or k is not None:
            raise ValueError("--pipeline-balance auto places every LLaMA layer itself: drop --decoder-first/last-"
                             "pipeline-num-layers and --num-layers-per-virtual-pipeline-stage")
        layers = balanced_stage_layers(num_layers, default_stages, stage_cost)
        return stages_per_rank(parallel, len(layers)), layers
    if parallel.pipeline_balance != "even":
        raise ValueError(f"--pipeline-balance {parallel.pipeline_balance!r}: choose even or auto")
    if any(n < 0 for n in ends) or sum(ends) > num_layers:
        raise ValueError(f"--decoder-first/last-pipeline-num-layers {first}/{last} do not fit {num_layers} layers")
    rest = num_layers - sum(ends)
    if k is not None:
        if k < 1 or rest % k:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {k} does not divide the {rest} layers to split")
        middle = rest // k
    else:
        middle = default_stages - len(ends)
        if (middle < 1 and rest) or (middle and rest % middle):
            raise ValueError(f"{rest} LLaMA layers cannot be split evenly over {middle} pipeline stages")
    virtual = stages_per_rank(parallel, middle + len(ends))
    per = rest // middle if middle else 0
    layers = ([first] if first is not None else []) + [per] * middle + ([last] if last is not None else [])
    return virtual, tuple(layers)


def stages_per_rank(parallel: ParallelConfig, total: int) -> int:
    """Virtual stages per PP rank for `total` stages, checked against the schedule."""
    pp = parallel.pipeline_model_parallel_size
    if total % pp:
        raise ValueError(f"{total} pipeline stages cannot be spread over --pipeline-model-parallel-size {pp}")
    virtual = total // pp
    if parallel.pipeline_schedule == "1f1b" and virtual != 1:
        raise ValueError(f"{total} stages over {pp} ranks needs --pipeline-schedule interleaved (1f1b holds one per rank)")
    if parallel.pipeline_schedule == "zero-bubble" and virtual != 2:
        raise ValueError(f"--pipeline-schedule zero-bubble (ZBV) needs 2 stages per rank, got {virtual}")
    if parallel.pipeline_schedule == "interleaved" and virtual < 2:
        raise ValueError("--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage "
                         "giving at least 2 stages per rank")
    return virtual


@dataclass
class ParallelMesh:
    """The DeviceMesh and this rank's coordinates in it."""

    dims: ParallelDims
    mesh: DeviceMesh  # ("pp", "dp", "tp")
    device: torch.device
    timeout: timedelta = timedelta(minutes=10)  # of every group (--distributed-timeout-minutes)
    owns_process_group: bool = False  # a one-rank group build_mesh started: close() ends it

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.mesh["pp"]

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    def sharding_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 1-D dp, or 2-D (replicate, shard) for hsdp and ddp."""
        if self.dims.sharding == "fsdp":
            return self.dp_mesh
        names = ("dp_replicate", "dp_shard")
        return self.dp_mesh._unflatten(0, (self.dims.dp_replicate, self.dims.dp_shard), names,
                                       backend_override=group_options(names, self.device, self.timeout))

    def new_gloo_group(self):
        """A CPU group over every rank (checkpoint coordination, exit flags), with the same timeout."""
        return dist.new_group(backend="gloo", timeout=self.timeout)

    def close(self) -> None:
        """End the one-rank process group build_mesh started, so that a later run in this
        process starts clean. A torchrun group is left to the launcher: destroying it while
        a failed peer is still inside a collective could hang."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def group_options(names, device: torch.device, timeout: timedelta) -> dict:
    """DeviceMesh backend overrides that carry `timeout`: torch's new groups otherwise take
    a default of their own (30 minutes for gloo), not the one init_process_group was given."""
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        backend = "nccl"
    else:
        options = dist.ProcessGroupGloo._Options()
        backend = "gloo"
    options._timeout = timeout
    return {name: (backend, options) for name in names}


def build_mesh(dims: ParallelDims, device: torch.device, timeout: timedelta = timedelta(minutes=10)) -> ParallelMesh:
    """The (pp, dp, tp) mesh of `dims`; one process without a process group gets a one-rank one."""
    started = not dist.is_initialized()
    if started:
        if dims.world_size != 1:
            raise ValueError(f"a mesh of {dims.world_size} ranks needs the process group of torchrun / srun")
        dist.init_process_group(backend_name(device), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    names = ("pp", "dp", "tp")
    mesh = init_device_mesh(device.type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=names,
                            backend_override=group_options(names, device, timeout))
    return ParallelMesh(dims, mesh, device, timeout, owns_process_group=started)


def backend_name(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_name: str, timeout: timedelta = timedelta(minutes=10)) -> tuple[int, torch.device]:
    """Join the process group started by torchrun/srun (if any): (world size, this rank's device).

    NCCL on GPU, gloo on CPU: the same code path, chosen from the device. `timeout`
    (--distributed-timeout-minutes): how long a collective waits for a silent rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend_name(device), timeout=timeout)
    return world_size, device
