"""Pipeline parallelism with torch.distributed.pipelining: stage split and schedules.

Stage 0 is multimodal: EVA ViT + ln_visual + Causal Former + token embedding + the
image splice + the first LLaMA layers. The last stage holds the final norm, the LM
head and the regression head; the mixed loss runs there. The tokens (labels, masks)
and the detached input embeddings (the l2 targets) travel with the hidden states:

    stage 0:      (mb index)               -> (hidden, tokens, targets)
    middle:       (hidden, tokens, targets) -> (hidden, tokens, targets)
    last:         (hidden, tokens, targets) -> (logits, regression, targets, tokens)

Micro-batches hold a variable number of images, which the schedules cannot chunk;
stage 0 therefore receives only the micro-batch index and reads the micro-batch from
a MicrobatchFeed filled before each step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from megatron_emu.model.emu import Emu
from megatron_emu.parallel.mesh import ParallelMesh


class MicrobatchFeed:
    """The current step's micro-batches, read by stage 0 by index."""

    def __init__(self):
        self.microbatches: list[dict] = []

    def __getitem__(self, index: int) -> dict:
        return self.microbatches[index]


class EmuStage(nn.Module):
    """One pipeline stage. Children keep Emu's names (llm.layers.7...), so parameter
    names, and checkpoints, are the same at every pipeline layout."""

    # Stage 0 runs Emu's own embedding and splice code.
    embed = Emu.embed
    encode_images = Emu.encode_images
    check_inputs = Emu.check_inputs

    def __init__(self, pruned: Emu, feed: MicrobatchFeed, is_first: bool, is_last: bool):
        super().__init__()
        self.config = pruned.config
        for name in ("visual", "ln_visual", "causal_former", "llm", "regression_head"):
            setattr(self, name, getattr(pruned, name))
        self.feed, self.is_first, self.is_last = feed, is_first, is_last

    def forward(self, *args):
        if self.is_first:
            (index,) = args  # (1,) micro-batch index
            batch = self.feed[int(index[0])]
            tokens = batch["tokens"]  # (B, S)
            hidden = self.embed(tokens, batch["images"])  # (B, S, H)
            targets = hidden.detach()  # (B, S, H): l2 targets, no gradient
        else:
            hidden, tokens, targets = args
            # On its first step torch.distributed.pipelining infers shapes by running each
            # stage on uninitialised buffers; clamping keeps those token ids indexable.
            # Real ids were validated on stage 0, so this changes nothing for them.
            tokens = tokens.clamp(0, self.config.llm.vocab_size - 1)
        hidden = self.llm.forward_layers(hidden)  # (B, S, H)
        if not self.is_last:
            return hidden, tokens, targets
        hidden = self.llm.norm(hidden)
        return self.llm.output(hidden), self.regression_head(hidden), targets, tokens

    @torch.no_grad()
    def init_weights(self) -> None:
        """Emu.init_weights for the parts this stage holds (after meta-device building)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif module.__class__.__name__ == "RMSNorm":
                nn.init.ones_(module.weight)
        for part in (self.visual, self.causal_former):
            if part is not None:
                part.init_weights(std)
        self.llm.init_weights(std)


def stage_indices(pmesh: ParallelMesh) -> list[int]:
    """Stages held by this PP rank: looped (r, r+pp, ...) or V-shaped (r, 2pp-1-r) for zero-bubble."""
    dims, rank = pmesh.dims, pmesh.pp_rank
    if dims.schedule == "zero-bubble":
        return [rank, 2 * dims.pp - 1 - rank]
    return [rank + i * dims.pp for i in range(dims.virtual_stages)]


def split_stage(full: Emu, stage: int, stage_layers: tuple[int, ...], feed: MicrobatchFeed) -> EmuStage:
    """A copy of `full` keeping only what stage `stage` runs."""
    first, last = stage == 0, stage == len(stage_layers) - 1
    pruned = copy.deepcopy(full)
    if not first:
        pruned.visual = pruned.ln_visual = pruned.causal_former = None
        pruned.llm.tok_embeddings = None
    if not last:
        pruned.llm.norm = pruned.llm.output = pruned.regression_head = None
    start = sum(stage_layers[:stage])
    keep = {str(i) for i in range(start, start + stage_layers[stage])}
    for name in list(pruned.llm.layers.keys()):
        if name not in keep:
            del pruned.llm.layers[name]
    return EmuStage(pruned, feed, first, last)


def build_schedule(parts: list[nn.Module], stages: list[int], pmesh: ParallelMesh, n_micro: int, loss_fn):
    """The torch.distributed.pipelining schedule over this rank's stages."""
    dims = pmesh.dims
    group = pmesh.pp_mesh.get_group()
    pipe_stages = [PipelineStage(part, index, dims.num_stages, pmesh.device, group=group)
                   for part, index in zip(parts, stages)]
    if dims.schedule == "1f1b":
        return Schedule1F1B(pipe_stages[0], n_micro, loss_fn=loss_fn)
    if dims.schedule == "interleaved":
        return ScheduleInterleaved1F1B(pipe_stages, n_micro, loss_fn=loss_fn)
    return ScheduleZBVZeroBubble(pipe_stages, n_micro, loss_fn=loss_fn)


def run_schedule(schedule, feed: MicrobatchFeed, microbatches: list[dict]) -> None:
    """One forward/backward over all micro-batches; grads end scaled by 1/len(microbatches)."""
    feed.microbatches = microbatches
    # Kept on the CPU: only stage 0 reads it (no device sync), and it is never sent.
    index = torch.arange(len(microbatches))  # chunked into (1,) per micro-batch
    # Ranks without the first (last) stage ignore the inputs (targets).
    schedule.step(index, target=index)
    feed.microbatches = []
