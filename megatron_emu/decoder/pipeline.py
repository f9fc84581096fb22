"""Text (+ context images) -> image: Emu regresses 32 embeddings, the finetuned UNet decodes.

1. prompt tokens `<s> [context: text and [IMG] <image>x32 [/IMG] blocks] text [IMG]`;
2. Emu regresses 32 embeddings autoregressively (conditions.generate_embeddings);
3. PNDM (50 steps) with classifier-free guidance against the null condition (Emu's
   embeddings for the empty prompt): eps = eps_null + s * (eps_cond - eps_null);
   s == 1 is the plain conditional model, so its null pass is skipped;
4. VAE decode -> uint8 RGB -> PNG.
Seeded: one generator draws every initial latent, so a batch is reproducible.
"""

from __future__ import annotations

import os

import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from megatron_emu.decoder.conditions import generate_for_prompts, null_condition
from megatron_emu.decoder.unet import check_condition_dim, vae_scale_factor


class EmuImagePipeline:
    def __init__(self, emu, tokenizer, unet, vae, scheduler_config: dict, where: str = "decoder"):
        from diffusers import PNDMScheduler

        check_condition_dim(unet, emu.config.llm.hidden, where)
        self.emu, self.tokenizer, self.unet, self.vae = emu.eval(), tokenizer, unet.eval(), vae.eval()
        # SD v1.5's sampling setup: PLMS steps only, final alpha not forced to one.
        self.scheduler = PNDMScheduler.from_config({**scheduler_config, "skip_prk_steps": True, "set_alpha_to_one": False})
        self._null = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def null(self) -> torch.Tensor:
        if self._null is None:
            self._null = null_condition(self.emu, self.tokenizer.bos_id)  # (32, H)
        return self._null

    def prompt_tokens(self, text: str, context: list[tuple[str, torch.Tensor | None]] = ()) -> tuple[list[int], torch.Tensor]:
        """`context` = [(text, uint8 (3, 224, 224) image or None)] shown before `text`.
        Built as text generation builds its prompts (generation/prompts.py), then [IMG]."""
        from megatron_emu.generation.prompts import build_prompt

        items = []
        for ctx_text, image in context:
            items += ([ctx_text] if ctx_text else []) + ([image] if image is not None else [])
        prompt = build_prompt(items + [text], self.tokenizer, self.emu.config)
        return prompt.tokens + [self.emu.config.special_tokens.img_start], prompt.images

    @torch.no_grad()
    def conditions(self, prompts: list[str], contexts: list[list] | None = None) -> torch.Tensor:
        contexts = contexts or [[] for _ in prompts]
        built = [self.prompt_tokens(p, c) for p, c in zip(prompts, contexts)]
        return generate_for_prompts(self.emu, [t for t, _ in built], [i for _, i in built])  # (B, 32, H)

    def predict_noise(self, latents, t, conditions, null, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) -> guided epsilon (B, C, h, w)."""
        if guidance_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=conditions).sample
        context = torch.cat([null.expand_as(conditions), conditions])  # (2B, 32, H)
        eps = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
        eps_null, eps_cond = eps.chunk(2)
        return eps_null + guidance_scale * (eps_cond - eps_null)

    @torch.no_grad()
    def denoise(self, conditions: torch.Tensor, height: int, width: int, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int = 0) -> torch.Tensor:
        """(B, 32, H) conditions -> uint8 images (B, 3, height, width)."""
        factor = vae_scale_factor(self.vae)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
        dtype = next(self.unet.parameters()).dtype
        conditions = conditions.to(self.device, dtype)
        null = self.null().to(self.device, dtype)
        shape = (conditions.shape[0], self.unet.config.in_channels, height // factor, width // factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator).to(self.device, dtype)  # (B, C, h, w)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        # Minutes per batch on CPU: show the steps (on a terminal; logs stay clean).
        for t in tqdm(self.scheduler.timesteps, desc="denoising", unit="step", disable=not sys.stderr.isatty()):
            eps = self.predict_noise(self.scheduler.scale_model_input(latents, t), t, conditions, null, guidance_scale)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample  # (B, 3, H, W)
        return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def __call__(self, prompts: list[str], contexts: list[list] | None = None, height: int = 512, width: int = 512,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0) -> torch.Tensor:
        conditions = self.conditions(prompts, contexts)
        return self.denoise(conditions, height, width, num_inference_steps, guidance_scale, seed)


def save_pngs(images: torch.Tensor, out_dir: str, stem: str = "image") -> list[str]:
    """uint8 (B, 3, H, W) -> out_dir/{stem}_{i}.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"{stem}_{i:03d}.png")
        Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(path)
        paths.append(path)
    return paths


def load_decoder(path: str, unet_subfolder: str = "unet"):
    """A finetuned decoder directory (train output: unet/, vae/, scheduler/) -> (unet, vae, schedule)."""
    from diffusers import UNet2DConditionModel

    from megatron_emu.decoder.unet import load_sd_components

    sd = load_sd_components(path)
    unet = sd.unet
    if unet_subfolder != "unet":
        if not os.path.isdir(os.path.join(path, unet_subfolder)):
            raise ValueError(f"{path}: no {unet_subfolder}/ subfolder")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=unet_subfolder)
    return unet, sd.vae, sd.scheduler_config
