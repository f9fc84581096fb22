"""Per-block forward + backward times at a run's shapes, for --pipeline-balance-costs.

    python tools/benchmark_throughput.py --preset tiny --seq-length 96 --micro-batch-size 2 \\
        --images-per-sample 2 --measure-block-costs runs/block_costs.json

One block of each kind (EVA block, Causal Former block, LLaMA layer), the encoder around
its blocks (pixels -> patch embedding -> ln_visual; queries -> norm -> projection) and the
heads with the loss (final norm, LM head, regression head, cross-entropy + l2), built as
pretraining builds them (fused norms, --bf16 autocast), run forward + backward on random
inputs of the micro-batch's shapes: --micro-batch-size sequences of --seq-length tokens
and micro-batch x --images-per-sample images. The kinds run interleaved, round after
round, so they see the same machine load; medians. Only one block of each kind is
built, so the file for a large preset can be measured on one device.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from megatron_emu.config import TrainConfig
from megatron_emu.data.random_batches import random_batch
from megatron_emu.kernels import apply_fused_norms
from megatron_emu.model.emu import Emu
from megatron_emu.model.llama import token_positions
from megatron_emu.model.loss import emu_loss
from megatron_emu.parallel.block_costs import PER_IMAGE, write_costs
from megatron_emu.training.precision import Precision


def one_block_models(config: TrainConfig, device: torch.device) -> tuple[Emu, Emu]:
    """(one block of every stack, no encoder blocks at all), initialised as pretraining does."""
    m = config.model
    one = dataclasses.replace(m, vision=dataclasses.replace(m.vision, layers=1),
                              causal_former=dataclasses.replace(m.causal_former, layers=1),
                              llm=dataclasses.replace(m.llm, layers=1))
    bare = dataclasses.replace(one, vision=dataclasses.replace(one.vision, layers=0),
                               causal_former=dataclasses.replace(one.causal_former, layers=0))
    models = []
    for model_config in (one, bare):
        torch.manual_seed(config.seed)
        emu = Emu(model_config).to(device)
        emu.init_weights(config.seed)
        if config.performance.fused_kernels:
            apply_fused_norms(emu, device.type)
        models.append(emu)
    return models[0], models[1]


def block_steps(config: TrainConfig, images_per_sample: float, device: torch.device) -> dict:
    """{kind: (forward + backward callable, how many images / sequences it runs)}."""
    m, d = config.model, config.data
    one, bare = one_block_models(config, device)
    precision = Precision(config.performance, device.type)
    b, s = d.micro_batch_size, d.seq_length
    n = max(1, round(b * images_per_sample))
    batch = random_batch(m, b, s, 0, seed=config.seed)
    tokens = batch["tokens"].to(device)
    images = torch.randint(0, 256, (n, 3, m.vision.image_size, m.vision.image_size), dtype=torch.uint8, device=device)
    leaf = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)  # noqa: E731
    vision_in, visual = leaf(n, m.vision.num_tokens, m.vision.width), leaf(n, m.vision.num_tokens, m.vision.width)
    queries, hidden = leaf(n, m.causal_former.num_query_tokens, m.causal_former.d_model), leaf(b, s, m.llm.hidden)
    cf = one.causal_former
    positions = token_positions(one.llm.rope, s)

    def backward_of(fn):
        def step():
            with precision.autocast():
                out = fn()
            out = out.float()
            out.backward(torch.ones_like(out) / out.numel())
        return step

    def head_step():
        with precision.autocast():
            logits, regression = one.head(hidden)
            loss = emu_loss(logits, regression, hidden.detach(), tokens, m.special_tokens, config.l2_loss_weight,
                            m.llm.vocab_size)
        loss.total.backward()

    return {
        "vision_block": (backward_of(lambda: one.visual.blocks[0](vision_in)), n),
        "causal_former_block": (backward_of(lambda: cf.blocks[0](queries, visual, cf.position_bias(
            m.causal_former.num_query_tokens, device))), n),
        "encoder_rest": (backward_of(lambda: bare.encode_images(images)), n),
        "llm_layer": (backward_of(lambda: one.llm.layers["0"](hidden, positions)), b),
        "head": (head_step, b),
    }


def measure_block_costs(config: TrainConfig, images_per_sample: float, path: str, warmup: int, timed: int,
                        device: torch.device) -> dict:
    """Time every kind interleaved, medians per image / per sequence; write `path`."""
    steps = block_steps(config, images_per_sample, device)
    samples = {kind: [] for kind in steps}
    for round_ in range(warmup + timed):
        for kind, (step, _) in steps.items():
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                samples[kind].append(time.perf_counter() - start)
    seconds = {kind: statistics.median(samples[kind]) / count for kind, (_, count) in steps.items()}
    measured_with = dict(device=str(device), threads=torch.get_num_threads(), dtype=config.performance.compute_dtype,
                         micro_batch_size=config.data.micro_batch_size, images_per_sample=images_per_sample,
                         fused_kernels=config.performance.fused_kernels, timed_rounds=timed,
                         per={kind: "image" if kind in PER_IMAGE else "sequence" for kind in steps},
                         torch=torch.__version__)
    return write_costs(path, config.model, config.data.seq_length, seconds, measured_with)



if __name__ == "__main__":  # a module of tools/benchmark_throughput.py, not a tool of its own
    from megatron_emu.cli import refuse_run_as_tool

    refuse_run_as_tool(__file__, "--measure-block-costs FILE",
                       "python tools/benchmark_throughput.py --preset tiny --seq-length 96 --images-per-sample 2 --measure-block-costs costs.json")
