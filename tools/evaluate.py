"""Score a checkpoint on the paper's benchmarks (section 5): zero-shot, two text examples, k-shot with RICES.

    python tools/evaluate.py --task vqav2 --checkpoint CKPT --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --image-dir val2014 --shots 0 4 --text-examples \
        --train-questions ..._train2014_questions.json --train-annotations ..._train2014_annotations.json \
        --train-image-dir train2014 --output-dir eval/
    torchrun --nproc-per-node 8 tools/evaluate.py ...   # data parallel x --tensor- x --pipeline-model-parallel-size

Tasks and their files: coco_caption (Karpathy dataset_coco.json, test split; the train and
restval splits are the RICES pool), vqav2 / okvqa (questions + annotations), vizwiz (val.json),
visdial (visdial_1.0_val.json + --dense-annotations), msvd_qa (test_qa.json + --video-map
youtube_mapping.txt), msrvtt_qa (test_qa.json), nextqa_oe (open-ended NExT-QA, the paper's
WUPS: NExT-OE's test.csv / val.csv, --video-map map_vid_vidorID.json, --extra-answers
add_reference_answer_*.json, --wordnet-dir), nextqa (multiple choice: test.csv / val.csv with
a0..a4), coco_fid (captions_val2014.json, --decoder, --inception-weights: needs the optional
`fid` extra, torch-fidelity). Writes <output-dir>/<task>/<setting>.json and <output-dir>/results.md;
rerun the same command after an interruption: cached answers are not recomputed.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser  # noqa: E402
from megatron_emu.config import PRESETS  # noqa: E402
from megatron_emu.evaluation.tasks import TASKS  # noqa: E402

EXAMPLE = ("python tools/evaluate.py --task coco_caption --checkpoint runs/tiny/ckpt "
           "--annotations dataset_coco.json --image-dir coco/ --output-dir eval/")
FILE_FLAGS = ("annotations", "questions", "dense_annotations", "image_dir", "video_dir", "video_map")


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__.splitlines()[0], example=EXAMPLE)
    p.add_argument("--task", choices=list(TASKS) + ["coco_fid"], help="the benchmark")
    p.add_argument("--checkpoint", "--load", dest="checkpoint", default="",
                   help="our checkpoint (any layout), an HF export or a state-dict file")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size of a state-dict file")
    p.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: the tiny tokenizer)")
    p.add_argument("--model", default="", choices=["", "emu", "emu-i"], help="prompt style (default: from the vocabulary)")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="k in-context examples (RICES), e.g. 0 2 4 8")
    p.add_argument("--text-examples", action="store_true", help="also zero-shot with two text-only examples (Table 1's *)")
    g = p.add_argument_group("benchmark files (the benchmark's own formats, local paths)")
    g.add_argument("--annotations", default="", help="annotation file (the task's doc lists which)")
    g.add_argument("--questions", default="", help="VQAv2 / OK-VQA questions file")
    g.add_argument("--dense-annotations", default="", help="VisDial dense relevance file")
    g.add_argument("--image-dir", default="", help="images (COCO: the folder holding val2014/)")
    g.add_argument("--video-dir", default="", help="videos: files or frame directories")
    g.add_argument("--video-map", default="", help="MSVD youtube_mapping.txt / NExT-QA map_vid_vidorID.json")
    g.add_argument("--extra-answers", default="", help="NExT-OE add_reference_answer_<split>.json (second answers)")
    g.add_argument("--wordnet-dir", default="", help="nextqa_oe: WordNet 3.0 dict/ directory (index.noun, data.noun, "
                   "...; default: nltk's corpora/wordnet under NLTK_DATA)")
    for name in FILE_FLAGS:
        g.add_argument(f"--train-{name.replace('_', '-')}", default="", help=f"--{name.replace('_', '-')} of the training split (RICES)")
    g.add_argument("--limit", type=int, default=0, help="only the first N samples (0: all)")
    g.add_argument("--rices-pool-size", type=int, default=5000, help="training samples RICES draws from (paper: 5000)")
    f = p.add_argument_group("coco_fid: text-to-image FID (--annotations captions_val2014.json)")
    f.add_argument("--decoder", default="", help="finetuned decoder dir (finetune_decoder.py output: unet/ vae/ scheduler/)")
    f.add_argument("--unet-subfolder", default="unet", help="unet (EMA when trained with it) or unet_trained")
    f.add_argument("--num-prompts", type=int, default=30000, help="validation captions drawn (paper: 30k)")
    f.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (paper: 5.0 for Emu)")
    f.add_argument("--num-inference-steps", type=int, default=50, help="PNDM steps (paper: 50)")
    f.add_argument("--image-size", type=int, default=512)
    f.add_argument("--inception-weights", default="", help="local FID Inception-v3 weights (torch-fidelity's .pth)")
    f.add_argument("--fid-reference-stats", default="", help="pytorch-fid .npz (mu, sigma) of the real images")
    f.add_argument("--fid-reference-dir", default="", help="or: the real images (statistics computed once, cached)")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=0, help="default: 30 for captions, 10 for answers")
    d.add_argument("--num-beams", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples answered together (and cached together)")
    p.add_argument("--output-dir", default="eval")
    p.add_argument("--no-java", action="store_true", help="caption metrics without Java (no METEOR/SPICE, python tokeniser)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP inside each data-parallel rank")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="LLaMA layers split over this many pipeline stages inside each data-parallel rank")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def settings_of(args) -> list[str]:
    settings = [str(k) for k in args.shots]
    if args.text_examples:
        settings.insert(settings.index("0") + 1 if "0" in settings else 0, "0*")
    return settings


def files_of(args) -> dict:
    files = {name: getattr(args, name) for name in FILE_FLAGS if getattr(args, name)}
    files.update({f"train_{name}": getattr(args, f"train_{name}") for name in FILE_FLAGS if getattr(args, f"train_{name}")})
    if args.extra_answers:  # the evaluated split's only (NExT-OE has none for train)
        files["extra_answers"] = args.extra_answers
    if args.task == "coco_caption":  # Karpathy's one file holds the train / restval splits too
        files.setdefault("train_annotations", files.get("annotations", ""))
        files.setdefault("train_image_dir", files.get("image_dir", ""))
    return files


def build(args):
    """This rank's part of the model (generation/inference.py: the one inference build)."""
    from megatron_emu.generation.inference import InferenceConfig, build_inference

    return build_inference(InferenceConfig(args.checkpoint, args.preset, tokenizer_model=args.tokenizer_model,
                                           tensor_model_parallel_size=args.tensor_model_parallel_size,
                                           pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                           device=args.device, bf16=args.bf16))


def run(args) -> str:
    from megatron_emu.evaluation.distributed import DataParallel
    from megatron_emu.evaluation.prompting import num_examples
    from megatron_emu.evaluation.report import checkpoint_identity, write_table
    from megatron_emu.evaluation.rices import Rices, draw_pool
    from megatron_emu.evaluation.runner import RunOptions, run_setting
    from megatron_emu.evaluation.tasks import get_task, read_samples
    from megatron_emu.generation import DecodingConfig, EmuGenerator

    if args.task == "coco_fid":
        return run_fid(args)
    spec, settings, files = get_task(args.task), settings_of(args), files_of(args)
    samples = read_samples(spec, files)[:args.limit or None]
    needs_examples = any(s != "0" for s in settings)
    pool = draw_pool(read_samples(spec, files, train=True), args.seed, args.rices_pool_size) if needs_examples else []
    if spec.kind == "wups":  # said before the model is loaded
        from megatron_emu.evaluation.wordnet import load_wordnet

        load_wordnet(args.wordnet_dir)
    largest = max(settings, key=num_examples)
    if len(pool) < num_examples(largest):  # said before the model is loaded
        raise ValueError(f"setting {largest} needs {num_examples(largest)} in-context examples; "
                         f"the training files hold {len(pool)} samples")
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens or spec.max_new_tokens, num_beams=args.num_beams,
                              seed=args.seed)
    decoding.validate()
    inference = build(args)
    try:
        dp = DataParallel.from_mesh(inference.pmesh)
        gen = EmuGenerator.from_run(inference, args.tokenizer_model, args.model)
        identity = checkpoint_identity(args.checkpoint)
        options = RunOptions(args.output_dir, decoding, args.batch_size,
                             {k: os.path.abspath(v) for k, v in files.items()}, False if args.no_java else None,
                             args.wordnet_dir)
        rices = Rices.build(gen.emu, spec, pool, os.path.join(args.output_dir, "rices_cache"), identity["xxh3"], dp,
                            gen.forward) if needs_examples else None
        for setting in settings:
            run_setting(gen, spec, setting, samples, rices, options, dp, identity)
        return write_table(args.output_dir) if dp.first else ""
    finally:
        inference.close()


def run_fid(args) -> str:
    from megatron_emu.evaluation.coco_files import read_caption_prompts

    if args.shots != [0] or args.text_examples:
        raise ValueError("coco_fid is zero-shot only (paper Table 2)")
    if not args.decoder:
        raise ValueError("--task coco_fid needs --decoder (the finetuned decoder directory)")
    if args.tensor_model_parallel_size > 1 or args.pipeline_model_parallel_size > 1:
        raise ValueError("--task coco_fid runs the whole Emu on each rank (data parallel only): "
                         "drop --tensor-model-parallel-size / --pipeline-model-parallel-size")
    from megatron_emu.evaluation.text_to_image import InceptionFeatures
    from megatron_emu.parallel.mesh import init_distributed

    prompts = read_caption_prompts(args.annotations, args.num_prompts, args.seed)
    _, device = init_distributed(args.device)  # the device build_inference will use too
    extractor = InceptionFeatures(args.inception_weights, device)  # its weights checked before Emu is read
    inference = build(args)
    try:
        return fid_on(inference, extractor, args, prompts)
    finally:
        inference.close()


def fid_on(inference, extractor, args, prompts) -> str:
    from megatron_emu.generation.frozen import freeze
    from megatron_emu.decoder.pipeline import EmuImagePipeline, load_decoder
    from megatron_emu.evaluation.distributed import DataParallel
    from megatron_emu.evaluation.report import checkpoint_identity, write_table
    from megatron_emu.evaluation.text_to_image import reference_statistics, run_fid
    from megatron_emu.generation import EmuGenerator

    device, dtype = inference.device, inference.dtype
    dp = DataParallel.from_mesh(inference.pmesh)
    gen = EmuGenerator.from_run(inference, args.tokenizer_model, args.model)
    unet, vae, schedule = load_decoder(args.decoder, args.unet_subfolder)
    pipe = EmuImagePipeline(gen.emu, gen.tokenizer, freeze(unet).to(device, dtype), freeze(vae).to(device, dtype),
                            schedule, where=args.decoder)
    reference = reference_statistics(args.fid_reference_stats, args.fid_reference_dir, extractor,
                                     os.path.join(args.output_dir, "coco_fid"))
    options = {"batch_size": args.batch_size, "height": args.image_size, "width": args.image_size,
               "steps": args.num_inference_steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
               "files": {"annotations": os.path.abspath(args.annotations), "decoder": os.path.abspath(args.decoder)}}
    run_fid(pipe, prompts, extractor, reference, args.output_dir, dp, options, checkpoint_identity(args.checkpoint),
            gen.model)
    return write_table(args.output_dir) if dp.first else ""


def main(argv=None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.task or not args.checkpoint:
        parser.error("--task and --checkpoint are required")
    try:
        table = run(args)
    except ValueError as e:
        sys.exit(f"evaluate.py: {e}")
    if table:
        print(table, end="")
    return table


if __name__ == "__main__":
    main()
    from megatron_emu.cli import end_process_group

    end_process_group()  # on success only: an error exited above
