"""Visual decoder (spec section 7): Stable Diffusion v1.5's UNet finetuned to decode Emu's
32 regressed visual embeddings into images; Emu and the VAE stay frozen.

unet.py        SD v1.5 components from a diffusers directory (or a config, for tests);
               cross-attention re-sized to Emu's hidden size
(the frozen Emu of --emu-load: generation/loading.py load_emu)
conditions.py  the 32 regressed embeddings per image, the null condition, dropping, cache
data.py        two indexed pair datasets mixed 7:2, images to 512x512, latent cache
train.py       the finetuning loop (epsilon prediction, DDPM, AdamW, step LR, EMA, DDP)
pipeline.py    prompt -> Emu regresses 32 embeddings -> UNet with CFG (PNDM) -> VAE -> PNG
"""
