#!/usr/bin/env python
"""Convert checkpoints between megatron_emu (DCP) and public formats.

Export (any TP/PP/DP layout):
  python tools/convert_checkpoint.py --to hf --input CKPT --output OUT [--tokenizer-model SP] [--dtype bf16]
      OUT: transformers LlamaForCausalLM dir (config.json, sharded safetensors + index, tokenizer
      with [PAD] [IMG] [/IMG] <image> at the spec ids) + OUT/visual/ (ViT, ln_visual, Causal
      Former, regression head; reload the whole Emu with megatron_emu.convert.hf_emu.load_emu_from_hf).
  python tools/convert_checkpoint.py --to peft --input ADAPTER_CKPT --output OUT   (LoRA: adapter_config.json + safetensors)
  python tools/convert_checkpoint.py --to diffusers --input DECODER_SAVE --output OUT
      the decoder's newest UNet (EMA weights if present) as a diffusers UNet2DConditionModel
      (--unet-config SD_UNET_DIR only for decoder checkpoints that do not store the UNet config).
Import (our checkpoint at iteration 0; train with --load OUT --finetune --use-checkpoint-args, which keeps
the norm eps / rope a LLaMA's config.json carried; a config field our LLaMA cannot compute is refused):
  python tools/convert_checkpoint.py --from hf-llama eva-clip --input LLAMA_DIR EVA.pt --preset emu-14b --output OUT
  python tools/convert_checkpoint.py --from emu-v1 --input Emu-pretrain.pt --preset emu-14b --output OUT
  python tools/convert_checkpoint.py --from emu-v1 --input Emu-instruct.pt --preset emu-14b --output OUT
      the released Emu-I: 32006 vocabulary rows -> an Emu-I checkpoint ([USER] [ASSISTANT]); its PEFT
      LoRA (if unmerged) folded in with --lora-alpha (the release's 16) / r.
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser, full_disk_as_error  # noqa: E402
from megatron_emu.config import PRESETS, get_preset  # noqa: E402
from megatron_emu.convert.imports import KINDS  # noqa: E402
from megatron_emu.convert.streams import parse_dtype  # noqa: E402


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                   example="python tools/convert_checkpoint.py --to hf --input runs/tiny/checkpoints --output runs/tiny/hf")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf", "diffusers", "peft"])
    direction.add_argument("--from", dest="source", nargs="+", choices=KINDS, help="one kind per --input")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output", required=True, help="must not exist (or be empty); written atomically")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size to import into")
    p.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: the tiny tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size,
                   help="export: safetensors shard size; import: tensors held before each write (peak memory)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="cast floats (default: keep)")
    p.add_argument("--seed", type=int, default=1234, help="init of modules no input provides")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="--from emu-v1 with unmerged PEFT LoRA (Emu-I): its alpha (default: the release's 16)")
    p.add_argument("--unet-config", default="", help="--to diffusers: a diffusers UNet dir whose config to use "
                   "(default: the config stored in the decoder checkpoint)")
    return p


def convert(args) -> None:
    """The one conversion the flags ask for, into args.output."""
    if args.to == "hf":
        from megatron_emu.convert.export import export_hf
        from megatron_emu.data.tokenizer import build_tiny_tokenizer

        tokenizer = args.tokenizer_model or build_tiny_tokenizer()
        export_hf(args.input[0], args.output, tokenizer, args.max_shard_size, parse_dtype(args.dtype))
    elif args.to == "peft":  # an instruction-tuning (adapters-only) checkpoint
        from megatron_emu.convert.peft_export import export_peft

        export_peft(args.input[0], args.output)
    elif args.to == "diffusers":
        from megatron_emu.decoder.diffusers_export import export_unet

        export_unet(args.input[0], args.output, args.unet_config)
    else:
        from megatron_emu.convert.imports import import_checkpoint

        if len(args.source) != len(args.input):
            raise SystemExit(f"--from names {len(args.source)} kinds but --input gives {len(args.input)} paths")
        from megatron_emu.convert.emu_i import EMU_I_LORA_ALPHA

        import_checkpoint(list(zip(args.source, args.input)), get_preset(args.preset), args.output,
                          preset=args.preset, seed=args.seed, dtype=parse_dtype(args.dtype),
                          max_shard_bytes=args.max_shard_size,
                          lora_alpha=EMU_I_LORA_ALPHA if args.lora_alpha is None else args.lora_alpha)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora_alpha is not None and "emu-v1" not in (args.source or []):
        parser.error("--lora-alpha is read only by --from emu-v1 (the released Emu-I's unmerged LoRA)")
    if args.tokenizer_model and args.to != "hf":  # an ignored flag would look like it had been used
        parser.error(f"--tokenizer-model is read only by --to hf (the export writes the tokenizer); "
                     f"{'--to ' + args.to if args.to else '--from ' + ' '.join(args.source)} does not use it")
    start = time.perf_counter()
    with full_disk_as_error(args.output, "nothing was written (the output appears whole or not at all): "
                            "free space, then run the same command"):
        convert(args)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.output) for f in files)
    print(json.dumps({"output": args.output, "bytes": size, "seconds": round(seconds, 2),
                      "GB_per_s": round(size / seconds / 1e9, 3)}))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}") from None
