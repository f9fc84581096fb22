"""The decoder finetuning loop (spec section 7), read top to bottom.

Per micro-batch: pairs -> latents (VAE, frozen, or the latent cache) and conditions
(Emu, frozen, or the condition cache) -> 10% of conditions replaced by the null one ->
DDPM forward noising at a uniform timestep -> UNet predicts the noise (epsilon) -> MSE.
Gradients accumulate over `global / (micro x world)` micro-batches (DDP syncs on the
last), then clip, AdamW, LR of the next step, EMA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from megatron_emu.config import get_preset
from megatron_emu.decoder import cache
from megatron_emu.decoder.arguments import DecoderConfig
from megatron_emu.decoder.checkpoint import load_checkpoint, save_checkpoint, save_final
from megatron_emu.decoder.conditions import drop_conditions, null_condition, pair_conditions
from megatron_emu.decoder.data import DecoderMicroBatches, build_loader, bundled_pairs, emu_pixels, vae_pixels
from megatron_emu.decoder.ema import EMA
from megatron_emu.generation.frozen import freeze
from megatron_emu.generation.inference import InferenceConfig, InferenceRun, build_inference
from megatron_emu.decoder.unet import build_tiny_sd, check_condition_dim, load_sd_components, resize_cross_attention
from megatron_emu.training.monitor import Sinks

log = logging.getLogger("megatron_emu")


@dataclass
class Frozen:
    """What the loop reads from but never trains."""

    emu: torch.nn.Module | None  # None when every condition comes from the cache
    vae: torch.nn.Module
    null: torch.Tensor  # (32, H) null condition
    bos_id: int
    conditions: cache.KeyedCaches | None = None
    latents: cache.KeyedCaches | None = None


@dataclass
class Summary:
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    dropped: int = 0
    samples: int = 0
    unet: torch.nn.Module | None = None  # the trained UNet (for callers that keep going in-process)


def load_tokenizer_bos(config: DecoderConfig) -> int:
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    tokenizer = EmuTokenizer(config.tokenizer_model or build_tiny_tokenizer(config.cache_dir or ""))
    expected = get_preset(config.preset).llm.base_vocab_size
    if tokenizer.base_vocab_size != expected:
        raise ValueError(f"{tokenizer.model_path}: {tokenizer.base_vocab_size} pieces, preset {config.preset!r} expects {expected}")
    return tokenizer.bos_id


def build_sd(config: DecoderConfig, hidden: int):
    """UNet (trainable, cross-attention re-sized to `hidden`), frozen VAE, noise schedule."""
    if config.pretrained_sd:
        sd = load_sd_components(config.pretrained_sd)
    else:
        log.warning("no --pretrained-sd: a tiny random UNet/VAE (smoke runs only)")
        sd = build_tiny_sd(cross_attention_dim=hidden, seed=config.seed)
    torch.manual_seed(config.seed)  # the re-initialised k/v are the same on every rank
    resize_cross_attention(sd.unet, hidden)
    check_condition_dim(sd.unet, hidden, config.pretrained_sd or "tiny SD")
    return sd.unet, freeze(sd.vae), sd.scheduler_config


def diffusion_loss(unet, vae, latents_or_moments, is_moments: bool, conditions, noise_scheduler,
                   generator: torch.Generator, bf16: bool) -> torch.Tensor:
    """Epsilon-prediction MSE of one micro-batch (SD's objective)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if is_moments:
        latents = DiagonalGaussianDistribution(latents_or_moments).sample(generator)  # (B, C, h, w)
    else:
        latents = latents_or_moments
    latents = latents.float() * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)  # (B, C, h, w)
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)  # (B,)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=bf16):
        predicted = unet(noisy, t, encoder_hidden_states=conditions).sample  # (B, C, h, w)
    return F.mse_loss(predicted.float(), noise)


@torch.no_grad()
def encode_batch(batch: dict, frozen: Frozen, config: DecoderConfig, device, generator):
    """-> (latents or latent moments, is_moments, conditions (B, 32, H) fp32)."""
    if frozen.latents is not None:
        latent_input, is_moments = frozen.latents.read(batch["keys"]).to(device), True
    else:
        pixels = vae_pixels(batch["images"], config.resolution).to(device, frozen.vae.dtype)  # (B, 3, R, R)
        latent_input, is_moments = frozen.vae.encode(pixels).latent_dist.sample(generator), False
    if frozen.conditions is not None:
        conditions = frozen.conditions.read(batch["keys"]).to(device)
    else:
        images = emu_pixels(batch["images"])  # uint8 (B, 3, 224, 224)
        conditions = pair_conditions(frozen.emu, batch["captions"], images, frozen.bos_id, config.condition_mode)
    return latent_input, is_moments, conditions.float()


def train_step(unet, optimizer, microbatches, frozen: Frozen, config, noise_scheduler, gens, device, summary) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches -> (mean loss, grad norm)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for m, batch in enumerate(microbatches):
        latent_input, is_moments, conditions = encode_batch(batch, frozen, config, device, gens["noise"])
        conditions, dropped = drop_conditions(conditions, frozen.null, config.cond_drop_prob, gens["drop"])
        summary.dropped += int(dropped.sum())
        summary.samples += conditions.shape[0]
        last = m == len(microbatches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(unet, "no_sync") else unet.no_sync()
        with sync:
            loss = diffusion_loss(unet, frozen.vae, latent_input, is_moments, conditions, noise_scheduler,
                                  gens["noise"], config.bf16)
            (loss / len(microbatches)).backward()
        total += loss.item()
    max_norm = config.clip_grad if config.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), max_norm).item()
    optimizer.step()
    return total / len(microbatches), grad_norm


def finetune(config: DecoderConfig) -> Summary:
    """Every rank holds the whole frozen Emu (the one inference build: a data-parallel mesh
    of the world size) and trains a DDP replica of the UNet."""
    model_config = get_preset(config.preset)
    inference = build_inference(InferenceConfig(config.emu_load, device=config.device, bf16=config.bf16,
                                                model=model_config))
    try:
        return finetune_on(inference, config)
    finally:
        inference.close()  # a single process's one-rank group; torchrun's is left to the launcher


def finetune_on(inference: InferenceRun, config: DecoderConfig) -> Summary:
    from diffusers import DDPMScheduler

    world, device, dtype = inference.dims.world_size, inference.device, inference.dtype
    rank = dist.get_rank() if world > 1 else 0
    per_rank = config.micro_batch_size * world
    if config.global_batch_size % per_rank:
        raise ValueError(f"--global-batch-size {config.global_batch_size} is not divisible by "
                         f"--micro-batch-size {config.micro_batch_size} x world size {world}")
    accumulation = config.global_batch_size // per_rank
    hidden = inference.emu.config.llm.hidden

    bos_id = load_tokenizer_bos(config)
    emu, inference.emu = inference.emu, None  # `frozen` becomes the one reference (a condition cache frees it)
    unet, vae, schedule = build_sd(config, hidden)
    unet, vae = unet.to(device).train(), vae.to(device, dtype)
    noise_scheduler = DDPMScheduler.from_config(schedule)
    frozen = Frozen(emu, vae, null_condition(emu, bos_id).float(), bos_id)
    del emu  # frozen.emu is the one reference, so a condition cache can free it
    if not config.data_path:  # tiny only (DecoderConfig.validate)
        config.data_path = bundled_pairs(config.cache_dir)
        if rank == 0:
            log.info("data: the bundled synthetic image-caption pairs %s", config.data_path[1])
    data = DecoderMicroBatches(config.data_path, config.micro_batch_size, accumulation, rank, world, config.seed,
                               config.max_caption_tokens)
    attach_caches(frozen, data, config, rank, world, device)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr_at(0), betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    ema = EMA(unet, config.ema_decay) if config.ema_decay > 0 else None
    gens = {"noise": torch.Generator(device).manual_seed(config.seed * 1000 + rank),
            "drop": torch.Generator().manual_seed(config.seed * 1000 + 500 + rank)}
    start = resume(config, unet, optimizer, ema, gens, rank, world)
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else unet
    if rank == 0:
        log.info("decoder finetune: UNet %.1fM trainable params, %d micro-batches of %d per step x %d ranks, from step %d",
                 sum(p.numel() for p in unet.parameters()) / 1e6, accumulation, config.micro_batch_size, world, start)

    summary = Summary()
    sinks = Sinks(config.logging, config, is_writer=rank == 0)
    loader = iter(build_loader(data, start, config.train_iters, config.num_workers))
    t0 = time.perf_counter()
    bar = tqdm(total=config.train_iters, initial=start, desc="finetune decoder", unit="it",
               disable=rank != 0 or not sys.stderr.isatty())
    for step in range(start, config.train_iters):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        microbatches = [next(loader) for _ in range(accumulation)]
        loss, grad_norm = train_step(model, optimizer, microbatches, frozen, config, noise_scheduler, gens, device, summary)
        if ema is not None:
            ema.update(unet)
        summary.history.append((step + 1, loss))
        bar.update(1)
        if (step + 1) % config.logging.tensorboard_log_interval == 0:
            sinks.scalars(step + 1, (step + 1) * config.global_batch_size, step_scalars(config, step, loss, grad_norm, ema))
        if rank == 0 and ((step + 1) % config.log_interval == 0 or step == start):
            rate = config.global_batch_size * (len(summary.history)) / (time.perf_counter() - t0)
            sinks.scalars(step + 1, (step + 1) * config.global_batch_size, {
                "images-per-sec": rate, "condition-drop-fraction": summary.dropped / max(summary.samples, 1)})
            print(f"iteration {step + 1:7d}/{config.train_iters} | lr {config.lr_at(step):.3e} | loss {loss:.5f} | "
                  f"grad norm {grad_norm:.3f} | dropped {summary.dropped / max(summary.samples, 1):.3f} | "
                  f"{rate:.1f} samples/s", file=sys.stdout, flush=True)
        if config.save and config.save_interval and (step + 1) % config.save_interval == 0:
            save_on_rank0(config.save, step + 1, unet, optimizer, ema, gens, rank, world)
    bar.close()
    sinks.close()
    if config.save:
        save_on_rank0(config.save, config.train_iters, unet, optimizer, ema, gens, rank, world)
        if rank == 0:
            out = save_final(os.path.join(config.save, "decoder"), unet, ema, vae.float(), schedule)
            log.info("decoder written to %s", out)
    if world > 1:
        dist.barrier()
    summary.unet = unet
    return summary


def step_scalars(config: DecoderConfig, step: int, loss: float, grad_norm: float, ema: EMA | None) -> dict[str, float]:
    """The decoder's scalars of one step (rank 0's loss, as the log line prints)."""
    values = {"diffusion loss": loss, "learning-rate": config.lr_at(step), "grad-norm": grad_norm}
    if ema is not None:
        values["ema-decay"] = ema.decay
    return values


def attach_caches(frozen: Frozen, data: DecoderMicroBatches, config: DecoderConfig, rank: int, world: int, device) -> None:
    """With --precompute-*, fill (once) and read the condition / latent caches."""
    from megatron_emu.decoder.precompute import condition_caches, latent_caches

    if config.precompute_conditions:
        frozen.conditions = condition_caches(frozen, data, config, rank, world, device)
    if config.precompute_latents:
        frozen.latents = latent_caches(frozen, data, config, rank, world, device)
    if frozen.conditions is not None:
        frozen.emu = None  # the cache replaces it: free the (14B) frozen Emu's memory
    if frozen.latents is not None and frozen.conditions is not None:
        data.read_images = False  # nothing left that needs pixels


def save_on_rank0(save: str, step: int, unet, optimizer, ema, gens, rank: int, world: int) -> None:
    """Every rank contributes its random generators (so a resume redraws the same noise
    and drops everywhere); the replicated UNet/optimizer/EMA come from rank 0."""
    mine = {k: g.get_state() for k, g in gens.items()}
    generators = [mine]
    if world > 1:
        generators = [None] * world
        dist.all_gather_object(generators, mine)
    if rank == 0:
        save_checkpoint(save, step, {
            "step": step, "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "generators": generators,
            "cross_attention_dim": unet.config.cross_attention_dim,
            "unet_config": dict(unet.config),  # lets --to diffusers rebuild the UNet without --unet-config
        })
    if world > 1:
        dist.barrier()


def resume(config: DecoderConfig, unet, optimizer, ema, gens, rank: int, world: int) -> int:
    """Restore the newest checkpoint under --load; returns the step to continue from."""
    if not config.load:
        return 0
    state = load_checkpoint(config.load)
    if state is None:
        return 0
    if state["cross_attention_dim"] != unet.config.cross_attention_dim:
        raise ValueError(f"{config.load}: checkpoint UNet reads {state['cross_attention_dim']}-wide conditions, "
                         f"this Emu gives {unet.config.cross_attention_dim}")
    unet.load_state_dict(state["unet"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    if len(state["generators"]) != world:
        raise ValueError(f"{config.load}: saved by {len(state['generators'])} ranks, resuming on {world} "
                         "(the noise/drop streams are per rank)")
    for name, g in gens.items():
        g.set_state(state["generators"][rank][name])
    return int(state["step"])
