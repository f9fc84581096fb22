"""Text-to-image with Emu and a finetuned decoder: one PNG per prompt.

    python tools/generate_image.py --preset emu-14b --emu-load EMU --tokenizer-model tok.model \
        --decoder RUN/decoder --prompt "a red cube on a table" --output-dir out/

Optional context: `--context-image a.png --context-text "a photo of a cat"` (shown
before every prompt, image first). Guidance 7.5, PNDM 50 steps by default.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_emu.cli import ToolParser  # noqa: E402
from megatron_emu.config import PRESETS, get_preset  # noqa: E402
from megatron_emu.decoder.arguments import DECODER_RECIPES, DecoderConfig  # noqa: E402
from megatron_emu.training.errors import exit_on_error  # noqa: E402


EXAMPLE = ('python tools/generate_image.py --emu-load runs/tiny/checkpoints --decoder runs/decoder_tiny/decoder '
           '--prompt "a red circle on the left"')


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__.splitlines()[0], example=EXAMPLE)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Emu size (default: tiny)")
    p.add_argument("--emu-load", default="", help="Emu checkpoint (DCP dir or state-dict file)")
    p.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: tiny tokenizer)")
    p.add_argument("--decoder", required=True, help="finetune output dir: unet/ vae/ scheduler/")
    p.add_argument("--unet-subfolder", default="unet", help="unet (EMA when trained with it) or unet_trained")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--context-image", action="append", default=[], help="image shown before the prompt")
    p.add_argument("--context-text", default="", help="text shown after the context images")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None, help="default: the preset's decoder resolution (tiny 64, else 512)")
    p.add_argument("--width", type=int, default=None, help="default: as --height")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output-dir", default="generated")
    return p


def read_context_image(path: str, size: int) -> torch.Tensor:
    """uint8 (3, size, size), resized and centre-cropped as in preprocessing."""
    from megatron_emu.data.preprocess import SkipItem, prepare_image

    try:
        return torch.from_numpy(prepare_image(path, size, name=path))
    except SkipItem as e:
        raise ValueError(f"{path}: unusable context image ({e.reason})") from None


def main(argv=None) -> list[str]:
    from diffusers.utils import logging as diffusers_logging

    from megatron_emu.generation.inference import InferenceConfig, build_inference

    args = build_parser().parse_args(argv)
    diffusers_logging.set_verbosity_error()  # notices about float32 modules when casting, at every start
    config = get_preset(args.preset)
    # The whole Emu of the preset (load_emu's forms: our checkpoint, a state-dict file), one process.
    inference = build_inference(InferenceConfig(args.emu_load, device=args.device, bf16=args.bf16, model=config))
    try:
        return generate(inference, args, config)
    finally:
        inference.close()


def generate(inference, args, config) -> list[str]:
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
    from megatron_emu.generation.frozen import freeze
    from megatron_emu.decoder.pipeline import EmuImagePipeline, load_decoder, save_pngs

    if inference.dims.world_size != 1:
        raise ValueError("generate_image.py runs in one process (no torchrun)")
    device, dtype, emu = inference.device, inference.dtype, inference.emu
    # What the preset's decoder recipe trains at (the paper's 512 but for tiny).
    resolution = DECODER_RECIPES.get(args.preset, {}).get("resolution", DecoderConfig.resolution)
    height, width = args.height or resolution, args.width or args.height or resolution
    tokenizer = EmuTokenizer(args.tokenizer_model or build_tiny_tokenizer())
    unet, vae, schedule = load_decoder(args.decoder, args.unet_subfolder)
    pipe = EmuImagePipeline(emu, tokenizer, freeze(unet).to(device, dtype), freeze(vae).to(device, dtype), schedule,
                            where=args.decoder)
    context = [("", read_context_image(p, config.vision.image_size)) for p in args.context_image]
    if args.context_text:
        context.append((args.context_text, None))
    images = pipe(args.prompt, [context] * len(args.prompt), height, width, args.num_inference_steps,
                  args.guidance_scale, args.seed)
    paths = save_pngs(images, args.output_dir)
    for prompt, path in zip(args.prompt, paths):
        print(f"{path}\t{prompt}")
    return paths


if __name__ == "__main__":
    exit_on_error(main)  # bad input (a checkpoint, a decoder dir, an image): one line, exit 2
    from megatron_emu.cli import end_process_group

    end_process_group()  # on success only: an error exited above
