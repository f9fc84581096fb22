"""Pipeline parallelism with torch.distributed.pipelining: stage split and schedules.

Each stage is an Emu without the pieces the other stages hold (EmuStage; model/emu.py's
embed -> layers -> head). Stage 0 is multimodal: EVA ViT + ln_visual + Causal Former +
token embedding + the image splice + the first LLaMA layers. The last stage holds the
final norm, the LM head and the regression head; the trainer's objective runs there, on
the micro-batch it reads from the feed, and the step returns each micro-batch's loss
terms. The tokens and the detached input embeddings (the l2 targets) travel with the
hidden states:

    stage 0:      (mb index)               -> (hidden, tokens, targets)
    middle:       (hidden, tokens, targets) -> (hidden, tokens, targets)
    last:         (hidden, tokens, targets) -> (logits, regression, targets, tokens)

With --pack-sequences the document ids (B, S) travel last in every tuple, and the
trainer pads each step's micro-batches with [PAD] rows to one row count.

Micro-batches hold a variable number of images, which the schedules cannot chunk;
stage 0 therefore receives only the micro-batch index and reads the micro-batch from
a MicrobatchFeed filled before each step.

Stages send and receive plain full tensors only: with tensor/sequence parallelism every
stage starts from a replicated input and gathers its output back (tensor_parallel.py),
and the last stage hands its vocab-/hidden-sharded head outputs to the loss as local
shards, re-wrapped as DTensors there (sharded_outputs). The stage metadata (shapes,
dtypes) is declared from the micro-batch shape (static mode): torch.distributed.pipelining
would otherwise infer it by running every stage forward and backward on uninitialised
receive buffers, and the loss's data-dependent branches (images present? text present?)
then take different paths on different TP ranks: mismatched TP collectives and wrong
gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining._backward import stage_backward

from megatron_emu.model.emu import Emu, EmuOutput
from megatron_emu.parallel.mesh import ParallelMesh

# What stages send each other in fp32 runs: the residual stream and the l2 targets.
# Under --bf16 both travel in bf16 (half the bytes, as Megatron's pipeline sends its
# activations in the compute dtype): the residual stream is rounded to bf16 at each
# stage boundary, and the l2 targets are bf16 on the last stage whatever the split
# (the loss casts them to fp32; FSDP2's bf16 policy would cast the received fp32
# targets to bf16 at its root anyway). --fp16 is refused with pipelining (train.py).
IO_DTYPE = torch.float32


class MicrobatchFeed:
    """The current step's micro-batches, read by stage 0 by index."""

    def __init__(self):
        self.microbatches: list[dict] = []

    def __getitem__(self, index: int) -> dict:
        return self.microbatches[index]


class EmuStage(Emu):
    """One pipeline stage: an Emu without the pieces other stages hold (model/emu.py).

    Children keep Emu's names (llm.layers.7...), so parameter names, and checkpoints, are
    the same at every pipeline layout; initialisation is per parameter name (model/init.py),
    so a stage gets the values the whole model would have. Only the stage's inputs and
    outputs differ from Emu.forward: the first stage reads its micro-batch from the feed by
    index, and every stage hands on the l2 targets and the tokens with the hidden states."""

    def __init__(self, pruned: Emu, feed: MicrobatchFeed, io_dtype: torch.dtype = IO_DTYPE):
        nn.Module.__init__(self)  # adopts the pruned Emu's pieces instead of building new ones
        self.config = pruned.config
        for name in ("visual", "ln_visual", "causal_former", "llm", "regression_head"):
            setattr(self, name, getattr(pruned, name))
        self.feed = feed
        self.io_dtype = io_dtype  # what this stage sends and receives (hidden, targets)

    @property
    def is_first(self) -> bool:
        return self.has_embed

    @property
    def is_last(self) -> bool:
        return self.has_head

    def forward(self, *args):
        if self.is_first:
            (index,) = args  # (1,) micro-batch index
            batch = self.feed[int(index[0])]
            tokens = batch["tokens"]  # (B, S)
            documents = (batch["document_ids"],) if "document_ids" in batch else ()  # packed rows
            hidden = self.embed(tokens, batch["images"]).to(self.io_dtype)  # (B, S, H)
            targets = hidden.detach()  # (B, S, H): l2 targets, no gradient
            if not hidden.requires_grad:  # everything up to here frozen: the schedule
                hidden.requires_grad_()  # still runs (and sends) this stage's backward
        else:
            hidden, tokens, targets, *documents = args
        hidden = self.layers(hidden, *documents)  # (B, S, H)
        if not self.is_last:
            return hidden.to(self.io_dtype), tokens, targets, *documents
        logits, regression = self.head(hidden)
        # Local shards (B, S, V/TP) and (B, S, H/TP): see sharded_outputs.
        return local(logits), local(regression), targets, tokens, *documents

    def io_metas(self, batch: int, seq: int, tp: int, packed: bool = False) -> tuple[tuple, tuple]:
        """(inputs, outputs) of this stage as meta tensors, for micro-batches of (batch, seq) tokens."""
        hidden = self.config.llm.hidden
        io = self.io_dtype
        documents = (meta(batch, seq, dtype=torch.long),) if packed else ()
        carried = (meta(batch, seq, hidden, dtype=io, grad=True), meta(batch, seq, dtype=torch.long),
                   meta(batch, seq, hidden, dtype=io), *documents)
        inputs = (meta(1, dtype=torch.long),) if self.is_first else carried  # stage 0: the micro-batch index
        if not self.is_last:
            return inputs, carried
        _, tokens, targets, *_ = carried
        # Local shards; under autocast the heads' matmuls give the compute dtype.
        logits = meta(batch, seq, self.config.llm.padded_vocab_size // tp, dtype=io, grad=True)
        regression = meta(batch, seq, hidden // tp, dtype=io, grad=True)
        return inputs, (logits, regression, targets, tokens, *documents)


def stage_indices(pmesh: ParallelMesh) -> list[int]:
    """Stages held by this PP rank: looped (r, r+pp, ...) or V-shaped (r, 2pp-1-r) for zero-bubble."""
    dims, rank = pmesh.dims, pmesh.pp_rank
    if dims.schedule == "zero-bubble":
        return [rank, 2 * dims.pp - 1 - rank]
    return [rank + i * dims.pp for i in range(dims.virtual_stages)]


def split_stage(full: Emu, stage: int, stage_layers: tuple[int, ...], feed: MicrobatchFeed,
                io_dtype: torch.dtype = IO_DTYPE) -> EmuStage:
    """A copy of `full` keeping only what stage `stage` runs; it exchanges activations in `io_dtype`."""
    return EmuStage(prune_to_stage(copy.deepcopy(full), stage, stage_layers), feed, io_dtype)


def prune_to_stage(model: Emu, stage: int, stage_layers: tuple[int, ...]) -> Emu:
    """`model` itself, without what other stages hold (in place: inference prunes its one copy).
    Where the stages split Emu is decided here only (training's EmuStage, inference's stage)."""
    first, last = stage == 0, stage == len(stage_layers) - 1
    if not first:
        model.visual = model.ln_visual = model.causal_former = None
        model.llm.tok_embeddings = None
    if not last:
        model.llm.norm = model.llm.output = model.regression_head = None
    start = sum(stage_layers[:stage])
    keep = {str(i) for i in range(start, start + stage_layers[stage])}
    for name in list(model.llm.layers.keys()):
        if name not in keep:
            del model.llm.layers[name]
    return model


def meta(*shape: int, dtype: torch.dtype = IO_DTYPE, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_outputs(outputs: tuple, pmesh: ParallelMesh) -> EmuOutput:
    """The last stage's outputs as Emu's: under TP its heads' local shards become DTensors
    sharded on the last dim (vocab / hidden) again, the heads' placement."""
    logits, regression, targets, *_ = outputs  # then tokens[, document ids]
    if pmesh.dims.tp > 1:
        logits = DTensor.from_local(logits, pmesh.tp_mesh, [Shard(-1)], run_check=False)
        regression = DTensor.from_local(regression, pmesh.tp_mesh, [Shard(-1)], run_check=False)
    return EmuOutput(logits, regression, targets)


class OverlappedStage(PipelineStage):
    """A pipeline stage whose data-parallel gradient reduction overlaps its last backward.

    torch's stage keeps FSDP2's gradient sync off for every backward and reduces each stage
    after the schedule (perform_reduce_grad): the reduce-scatters of the whole stage then
    wait behind the pipeline's drain. Here the last micro-batch's full backward (1F1B,
    interleaved) runs with sync on, so each block is reduce-scattered as soon as its
    gradients are final, as without PP (tests/test_overlap_grad_reduce.py);
    perform_reduce_grad then finds nothing left (FSDP2's post_backward is idempotent) and
    only scales. Zero-bubble splits backward into input and weight halves: unchanged."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if not (last_backward and backward_type == "full" and isinstance(self.submod, FSDPModule)):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        self.submod.set_is_last_backward(True)
        self.submod.set_reshard_after_backward(True)
        self.submod.set_requires_gradient_sync(True)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None


class EmuPipeline:
    """This rank's stages and their schedule, built on the first step from the micro-batch
    shape (static stage metadata, see the module docstring) and rebuilt if it changes.

    `objective(outputs, batch) -> EmuLoss`: the loss of one micro-batch from Emu's outputs
    (the trainer's; the last stage calls it). `step` returns, per micro-batch, the loss terms
    this rank computed (the last stage's ranks; other ranks: an empty list)."""

    def __init__(self, parts: list[EmuStage], stages: list[int], pmesh: ParallelMesh, n_micro: int, objective):
        self.parts, self.stages, self.pmesh, self.n_micro = parts, stages, pmesh, n_micro
        self.objective, self.feed = objective, parts[0].feed
        self.schedule, self.shape = None, None
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's: index -> (lm, l2)

    def loss_fn(self, outputs: tuple, index: torch.Tensor) -> torch.Tensor:
        """The schedule's loss: the objective of micro-batch `index`; records its terms."""
        i = int(index[0])
        loss = self.objective(sharded_outputs(outputs, self.pmesh), self.feed[i])
        self.recorded[i] = (loss.lm.detach(), loss.l2.detach())
        return loss.total

    def build(self, shape: tuple[int, int, bool]):
        """shape: (rows, seq_length, packed) of every micro-batch of the step."""
        dims, group = self.pmesh.dims, self.pmesh.pp_mesh.get_group()
        pipe_stages = []
        for part, index in zip(self.parts, self.stages):
            inputs, outputs = part.io_metas(*shape[:2], tp=dims.tp, packed=shape[2])
            pipe_stages.append(OverlappedStage(part, index, dims.num_stages, self.pmesh.device,
                                               input_args=inputs, output_args=outputs, group=group))
        if dims.schedule == "1f1b":
            return Schedule1F1B(pipe_stages[0], self.n_micro, loss_fn=self.loss_fn)
        if dims.schedule == "interleaved":
            return ScheduleInterleaved1F1B(pipe_stages, self.n_micro, loss_fn=self.loss_fn)
        return ScheduleZBVZeroBubble(pipe_stages, self.n_micro, loss_fn=self.loss_fn)

    def step(self, microbatches: list[dict], forward_only: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward/backward over all micro-batches; grads end scaled by 1/len(microbatches).
        forward_only: validation (the loss is still computed per micro-batch, no backward).
        Micro-batches must share one token shape (packed rows: pad them, training/step.py)."""
        shapes = {(*b["tokens"].shape, "document_ids" in b) for b in microbatches}
        if len(shapes) != 1 or len(microbatches) != self.n_micro:
            raise ValueError(f"pipeline step: expected {self.n_micro} micro-batches of one token shape, "
                             f"got {len(microbatches)} with shapes {sorted(shapes)}")
        (shape,) = shapes
        if shape != self.shape:
            self.schedule, self.shape = self.build(shape), shape
        self.feed.microbatches, self.recorded = microbatches, {}
        # Kept on the CPU: only stage 0 reads it (no device sync), and it is never sent.
        index = torch.arange(len(microbatches))  # chunked into (1,) per micro-batch
        try:
            # Ranks without the first (last) stage ignore the inputs (targets).
            run = self.schedule.eval if forward_only else self.schedule.step
            run(index, target=index)
        finally:
            self.feed.microbatches = []
        return [self.recorded[i] for i in sorted(self.recorded)]
