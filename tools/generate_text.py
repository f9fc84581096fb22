"""Text from images, videos and text with Emu: captions, VQA, video QA, in-context, chat.

    python tools/generate_text.py --load CKPT --task caption --image cat.png --image dog.png
    python tools/generate_text.py --load CKPT --task vqa --image cat.png --question "what colour is the cat?"
    python tools/generate_text.py --load CKPT --task video-qa --video frames_dir/ --question "what moves?"
    python tools/generate_text.py --load CKPT --task few-shot --example a.png "a red circle" --image q.png
    python tools/generate_text.py --load EMU_I --task chat --image cat.png --question "what is it?"
    python tools/generate_text.py --load EMU_I --task chat --question "what comes after two?"   (no image: language chat)
    python tools/generate_text.py --load ADAPTERS --task chat --question "hi"   (a LoRA checkpoint on its recorded base)
    python tools/generate_text.py --load CKPT --prompt "<img:cat.png> a photo of" --prompt "once upon"
    torchrun --nproc-per-node 2 tools/generate_text.py --load CKPT --image cat.png --tensor-model-parallel-size 2
    torchrun --nproc-per-node 2 tools/generate_text.py --load CKPT --image cat.png --pipeline-model-parallel-size 2

--load takes our checkpoint (any TP/PP/DP layout), an instruction-tuning adapter checkpoint (on the
base it records, or --pretrained-checkpoint), an HF export or a state-dict file.
One result per line: the prompt's visual and question, a tab, the generated text.
"""

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser  # noqa: E402
from megatron_emu.config import PRESETS  # noqa: E402

TASKS = ("caption", "vqa", "video-qa", "video-temporal-qa", "few-shot", "chat", "prompt")
# The checkpoint of README command 1 (python pretrain_emu.py) and an image of the synthetic corpus.
USAGE_EXAMPLE = "python tools/generate_text.py --load runs/tiny/checkpoints --task caption --image red_circle.png"


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__.splitlines()[0], example=USAGE_EXAMPLE)
    p.add_argument("--load", default="", help="checkpoint dir (DCP), HF export dir, or .safetensors/.pt state dict")
    p.add_argument("--pretrained-checkpoint", default="",
                   help="the base of an adapter checkpoint --load (default: the base it records; another base is refused)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size of a state-dict file")
    p.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: the tiny tokenizer)")
    p.add_argument("--task", default="", choices=TASKS, help="default: caption with --image, else prompt")
    p.add_argument("--model", default="", choices=["", "emu", "emu-i"], help="prompt style (default: from the vocabulary)")
    p.add_argument("--image", action="append", default=[], help="one query per image (repeat)")
    p.add_argument("--video", action="append", default=[], help="directory of frames or video file (8 frames kept)")
    p.add_argument("--question", action="append", default=[],
                   help="one per image/video, or one for all; chat without --image/--video: one conversation each")
    p.add_argument("--turn", nargs=2, action="append", default=[], metavar=("QUESTION", "ANSWER"),
                   help="chat: an earlier turn of the conversation (repeat, in order)")
    p.add_argument("--example", nargs=2, action="append", default=[], metavar=("VISUAL", "TEXT"),
                   help="few-shot: an in-context example (image or video path, its text with the answer)")
    p.add_argument("--prompt", action="append", default=[], help="free prompt; <img:PATH> / <video:PATH> insert media")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="shard the model over this many ranks (torchrun; ranks beyond TP x PP split the prompts, rank 0 prints)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="split the LLaMA layers over this many pipeline stages (torchrun: TP x PP ranks)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def visual(path: str):
    from megatron_emu.generation import Video

    return Video.from_path(path) if os.path.isdir(path) or not looks_like_image(path) else Path(path)


def looks_like_image(path: str) -> bool:
    return path.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"))


def free_prompt(text: str) -> list:
    """"<img:a.png> a photo of" -> [Path("a.png"), " a photo of"]."""
    items = []
    for piece in re.split(r"(<(?:img|video):[^>]+>)", text):
        if piece.startswith(("<img:", "<video:")):
            items.append(visual(piece[piece.index(":") + 1:-1]))
        elif piece:
            items.append(piece)
    return items


def queries(args, gen) -> list[tuple[str, list]]:
    """(label, interleaved prompt) for every query of the task."""
    from megatron_emu.generation.prompts import few_shot_prompt, task_prompt, task_text

    task = args.task or ("caption" if args.image else "prompt")
    if task == "prompt":
        return [(text, free_prompt(text)) for text in args.prompt]
    if args.turn and task != "chat":
        raise ValueError(f"--turn gives a chat's earlier turns; --task {task} has none (use --task chat)")
    if task == "chat":
        return chat_queries(args)
    paths = args.video if task.startswith("video") else args.image
    if not paths:
        raise ValueError(f"--task {task} needs {'--video' if task.startswith('video') else '--image'}")
    questions = args.question * len(paths) if len(args.question) == 1 else args.question
    if task in ("vqa", "video-qa", "video-temporal-qa") and len(questions) != len(paths):
        raise ValueError(f"--task {task}: give one --question per {'video' if task.startswith('video') else 'image'}"
                         f" or one for all ({len(questions)} for {len(paths)})")
    if task == "caption":
        return [(p, task_prompt(visual(p), "caption", gen.model)) for p in paths]
    if task == "few-shot":
        examples = [(visual(v), text) for v, text in args.example]
        query = task_text("caption", gen.model)
        return [(p, few_shot_prompt(examples, (visual(p), query))) for p in paths]
    return [(f"{p}\t{q}", (p, q)) for p, q in zip(paths, questions)]  # answered by the API's task methods


def chat_queries(args) -> list[tuple[str, tuple]]:
    """Emu-I chat: one conversation per image / video with its question, or, with neither, one
    language-only conversation per --question (no system message, Appendix B.2)."""
    paths = args.image + args.video
    if not args.question:
        raise ValueError("--task chat needs --question")
    if not paths:
        return [(q, (None, q)) for q in args.question]
    questions = args.question * len(paths) if len(args.question) == 1 else args.question
    if len(questions) != len(paths):
        raise ValueError(f"--task chat: give one --question per image / video or one for all "
                         f"({len(questions)} for {len(paths)})")
    return [(f"{p}\t{q}", (p, q)) for p, q in zip(paths, questions)]


def run(args) -> list[str]:
    from megatron_emu.generation.inference import InferenceConfig, build_inference

    inference = build_inference(InferenceConfig(
        args.load, args.preset, args.pretrained_checkpoint, args.tokenizer_model, args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size, args.device, args.bf16))
    try:
        return answer_all(inference, args)
    finally:
        inference.close()


def answer_all(inference, args) -> list[str]:
    """Every query's line, in order. Data-parallel ranks (world / (TP x PP) > 1) answer a strided
    share of the batches each and gather the lines: the batches are those one process decodes
    (sampling's seed is per batch), so every line is the one process's. The ranks of one
    TP x PP group answer the same batches."""
    from tqdm import tqdm

    from megatron_emu.evaluation.distributed import DataParallel
    from megatron_emu.generation import DecodingConfig, EmuGenerator

    gen = EmuGenerator.from_run(inference, args.tokenizer_model, args.model)
    config = DecodingConfig(args.max_new_tokens, args.num_beams, args.sample, args.temperature, args.top_k, args.top_p,
                            args.repetition_penalty, args.length_penalty, args.seed)
    config.validate()
    todo, dp = queries(args, gen), DataParallel.from_mesh(inference.pmesh)
    turns = [tuple(t) for t in args.turn]
    task = args.task or ("caption" if args.image else "prompt")
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    mine = {}
    with tqdm(total=sum(len(b) for b in dp.shard(batches)), desc="prompts", unit="prompt", file=sys.stderr,
              disable=not first_rank()) as bar:
        for index in dp.shard_indices(len(batches)):
            batch = batches[index]
            texts = answer(gen, task, [q for _, q in batch], config, turns)
            mine[index] = [f"{label}\t{text}" for (label, _), text in zip(batch, texts)]
            bar.update(len(batch))
    answered = dp.gather(mine)
    return [line for index in range(len(batches)) for line in answered[index]]


def first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def answer(gen, task: str, batch: list, config, turns: list[tuple[str, str]]) -> list[str]:
    if task in ("prompt", "caption", "few-shot"):
        return gen.texts(batch, config)
    if task == "chat":
        return [gen.chat(q, turns, None if p is None else visual(p), config) for p, q in batch]
    visuals, questions = [visual(p) for p, _ in batch], [q for _, q in batch]
    if task == "vqa":
        return gen.vqa(visuals, questions, config)
    return gen.video_qa(visuals, questions, temporal=task == "video-temporal-qa", config=config)


def main(argv=None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.load:
        parser.error("--load CHECKPOINT is required")
    if not (args.image or args.video or args.prompt or (args.task == "chat" and args.question)):
        parser.error("nothing to do: give --image, --video or --prompt (or --task chat --question)")
    try:
        lines = run(args)
    except ValueError as e:
        sys.exit(f"generate_text.py: {e}")
    if first_rank():
        for line in lines:
            print(line)
    return lines


if __name__ == "__main__":
    main()
    from megatron_emu.cli import end_process_group

    end_process_group()  # on success only: an error exited above
