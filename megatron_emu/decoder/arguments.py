"""finetune_decoder.py's flags (Megatron names where Megatron has one) -> DecoderConfig.

DecoderConfig's defaults are the paper's recipe (spec section 7): AdamW (0.9, 0.999), wd
1e-2, LR warmup to 1e-4 over 5k steps, 5e-5 from 10k, 1e-5 from 14k, 15k steps, 50 per
GPU x 4 accumulation x 8 GPUs = global batch 1600, 512x512, 10% condition drop. On the
command line, like pretrain_emu.py, the preset defaults to `tiny` and flags left unset
take the preset's recipe (DECODER_RECIPES): tiny is a CPU run of about a minute and a half on the
bundled synthetic corpus's image-caption pairs, written to runs/decoder_tiny.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_emu.logging_args import add_sink_args, sink_config
from megatron_emu.config import PRESETS, LoggingConfig


CONDITION_MODES = ("teacher-forced", "generated")  # decoder/conditions.py builds each

# Flags left unset on the command line take these; presets not listed take the paper's
# recipe (DecoderConfig's defaults).
DECODER_RECIPES: dict[str, dict] = {
    # ~2.6 samples/s on 2 CPU cores: 60 steps of 4 are about a minute and a half.
    "tiny": dict(micro_batch_size=4, global_batch_size=4, resolution=64, train_iters=60, lr=1e-3,
                 lr_warmup_iters=10, lr_step_iters=[40, 50], lr_step_values=[5e-4, 1e-4], save_interval=30,
                 save="runs/decoder_tiny"),
}
RECIPE_FLAGS = ("micro_batch_size", "global_batch_size", "resolution", "train_iters", "lr", "lr_warmup_iters",
                "lr_step_iters", "lr_step_values", "save_interval", "save")


@dataclass
class DecoderConfig:
    # frozen models
    preset: str = "emu-14b"
    emu_load: str = ""  # empty: a random Emu (smoke runs only)
    tokenizer_model: str = ""  # empty: the tiny tokenizer (tiny preset)
    pretrained_sd: str = ""  # empty: a tiny random SD (smoke runs only)
    # conditions
    condition_mode: str = "teacher-forced"
    cond_drop_prob: float = 0.1
    # data
    data_path: list[str] = field(default_factory=list)
    micro_batch_size: int = 50
    global_batch_size: int = 1600
    resolution: int = 512
    max_caption_tokens: int = 150
    num_workers: int = 2
    precompute_conditions: bool = False
    precompute_latents: bool = False
    cache_dir: str = ""
    # optimisation
    lr: float = 1e-4
    lr_warmup_iters: int = 5000
    lr_step_iters: list[int] = field(default_factory=lambda: [10000, 14000])
    lr_step_values: list[float] = field(default_factory=lambda: [5e-5, 1e-5])
    train_iters: int = 15000
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA
    bf16: bool = False
    # checkpoints / run
    save: str = ""
    save_interval: int = 1000
    load: str = ""
    seed: int = 1234
    log_interval: int = 10
    device: str = "auto"
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # TensorBoard / W&B (the sink flags only)

    def lr_at(self, step: int) -> float:
        """LR of optimizer step `step` (0-based): linear warmup, then the step-wise values."""
        if step < self.lr_warmup_iters:
            return self.lr * (step + 1) / self.lr_warmup_iters
        lr = self.lr
        for boundary, value in zip(self.lr_step_iters, self.lr_step_values):
            if step >= boundary:
                lr = value
        return lr

    def validate(self) -> None:
        if len(self.lr_step_iters) != len(self.lr_step_values):
            raise ValueError("--lr-step-iters and --lr-step-values must have the same length")
        if self.condition_mode not in CONDITION_MODES:
            raise ValueError(f"--condition-mode must be one of {CONDITION_MODES}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"--cond-drop-prob must be in [0, 1], got {self.cond_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.resolution % 8:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of 8 (the VAE's downsampling)")
        if not self.data_path and self.preset != "tiny":
            raise ValueError("--data-path is required: W1 PAIRS_PREFIX1 W2 PAIRS_PREFIX2 (paper: 7 LAION-COCO 2 "
                             "LAION-Aesthetics); only --preset tiny defaults to the bundled synthetic pairs")
        if (self.precompute_conditions or self.precompute_latents) and not self.cache_dir:
            raise ValueError("--precompute-conditions/--precompute-latents need --cache-dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Finetune the Stable Diffusion v1.5 UNet on Emu's regressed embeddings.",
                                epilog="Flags left unset take the preset's recipe: tiny's (DECODER_RECIPES), "
                                       "else the paper's.")
    d = DecoderConfig()
    g = p.add_argument_group("frozen models")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Emu size (default: tiny, a CPU run)")
    g.add_argument("--emu-load", default="", help="Emu checkpoint (DCP dir or state-dict file)")
    g.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: tiny tokenizer)")
    g.add_argument("--pretrained-sd", default="", help="diffusers SD v1.5 dir with unet/ vae/ scheduler/")
    g = p.add_argument_group("conditions")
    g.add_argument("--condition-mode", default=d.condition_mode, choices=CONDITION_MODES)
    g.add_argument("--cond-drop-prob", type=float, default=d.cond_drop_prob)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[],
                   help="W1 PREFIX1 W2 PREFIX2 (pair datasets); tiny: empty = the bundled synthetic pairs")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--resolution", type=int, default=None, help="VAE input size")
    g.add_argument("--max-caption-tokens", type=int, default=d.max_caption_tokens)
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--precompute-conditions", action="store_true")
    g.add_argument("--precompute-latents", action="store_true")
    g.add_argument("--cache-dir", default="")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-step-iters", type=int, nargs="*", default=None)
    g.add_argument("--lr-step-values", type=float, nargs="*", default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=d.adam_eps)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 = no EMA (try 0.9999)")
    g.add_argument("--bf16", action="store_true")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoints, and the final diffusers decoder in SAVE/decoder "
                                                  "(tiny default: runs/decoder_tiny)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default="")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--log-interval", type=int, default=d.log_interval)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_sink_args(p)
    return p


def parse_decoder_args(argv: list[str] | None = None) -> DecoderConfig:
    args = build_parser().parse_args(argv)
    recipe = {**{k: getattr(DecoderConfig(), k) for k in RECIPE_FLAGS}, **DECODER_RECIPES.get(args.preset, {})}
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fields = [k for k in DecoderConfig.__dataclass_fields__ if k != "logging"]
    config = DecoderConfig(**{k: getattr(args, k) for k in fields}, logging=sink_config(args))
    config.validate()
    return config
