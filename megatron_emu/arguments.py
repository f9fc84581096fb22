"""Megatron-LM flag names -> the typed dataclasses of config.py, in one place.

Each concern adds its flags in its own function; FIELDS says which field each one sets.
Flags have no defaults: `to_config` starts from the preset's recipe (config.recipe_config)
and replaces the fields of the flags given. The dataclasses check their own values.
"""

import argparse
import dataclasses
import sys

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS, PRESETS, ModelConfig, TrainConfig, recipe_config, with_fields
from megatron_emu.logging_args import add_logging_args, logging_config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    g.add_argument("--l2-loss-weight", type=float, default=None, help="lambda in CE + lambda * l2")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the embedding/LM-head rows to a multiple of this (Megatron; e.g. 128 so TP=8 "
                        "splits them); padded ids are never predicted (default: the preset's, 1 = unpadded)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="W1 PREFIX1 W2 PREFIX2 ...; none = synthetic corpus")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's recipe)")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes (default 1)")
    g.add_argument("--prefetch-factor", type=int, default=None,
                   help="micro-batches each DataLoader worker prepares ahead (default 2)")
    g.add_argument("--data-cache-dir", default=None, help="where the synthetic corpus/tokenizer are cached")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model (default: tiny tokenizer)")
    g.add_argument("--pack-sequences", action="store_true", default=None,
                   help="pack each micro-batch's samples into as few --seq-length rows as hold them; attention, "
                        "positions and targets stay within each sample (no compute spent on padding)")
    g.add_argument("--split", default=None,
                   help="train,valid,test weights over each dataset's samples, e.g. 969,30,1 (Megatron); "
                        "default: the preset's recipe (tiny: 98,2,0; others: all train)")
    g.add_argument("--data-blend", default=None, choices=["shares", "weighted"],
                   help="shares: --data-path weights are exact per-global-batch shares (the paper); "
                        "weighted: megatron-core's greedy weighted blending")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=None, help="peak LR of the LLM (paper: 3e-5)")
    g.add_argument("--lr-vision", type=float, default=None, help="peak LR of EVA-CLIP (paper: 4e-5)")
    g.add_argument("--lr-causal-former", type=float, default=None, help="peak LR of Causal Former + regression head (paper: 1e-4)")
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", default=None, choices=["cosine", "linear", "constant"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=None)
    g.add_argument("--adam-beta2", type=float, default=None)
    g.add_argument("--adam-eps", type=float, default=None)
    g.add_argument("--clip-grad", type=float, default=None, help="global grad-norm clip (0 = off)")
    g.add_argument("--freeze-vision", action="store_true", default=None)
    g.add_argument("--freeze-causal-former", action="store_true", default=None)
    g.add_argument("--freeze-llm", action="store_true", default=None)
    g.add_argument("--override-opt-param-scheduler", action="store_true", default=None,
                   help="on resume, take the LR schedule (--lr, --min-lr, warmup, decay, per-module LRs, "
                        "--weight-decay) from the flags, not from the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true", default=None,
                   help="on resume, take the LR schedule from the checkpoint, whatever the flags say")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism", "data-parallel size = world size / (TP x PP)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP: split heads/FFN/vocab over ranks")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="PP: split LLaMA layers into stages")
    g.add_argument("--sequence-parallel", action="store_true", default=None, help="shard LLaMA norms/residuals along the sequence (TP > 1)")
    g.add_argument("--pipeline-schedule", default=None, choices=["1f1b", "interleaved", "zero-bubble"])
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved schedule: LLaMA layers per virtual stage")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="LLaMA layers on the first stage (which also holds the ViT and Causal Former)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, help="LLaMA layers on the last stage")
    g.add_argument("--pipeline-balance", default=None, choices=["even", "auto"],
                   help="even: LLaMA layers split evenly (after the ends above); auto: placed so that every stage's "
                        "forward + backward FLOPs, ViT and Causal Former on the first and heads on the last, are "
                        "as equal as whole layers allow")
    g.add_argument("--pipeline-balance-images-per-sample", type=float, default=None,
                   help="auto: images (and video frames) per sample of the data mix (default 2, the paper's mix)")
    g.add_argument("--pipeline-balance-costs", default=None, metavar="FILE",
                   help="auto: weigh stages by the measured per-block times of FILE (written by "
                        "tools/benchmark_throughput.py --measure-block-costs) instead of FLOPs")
    g.add_argument("--vision-tensor-parallel", default=None, choices=["heads", "images", "auto"],
                   help="TP placement of the ViT and Causal Former: heads (split heads where TP divides them, else "
                        "replicate), images (replicate; each TP rank encodes 1/TP of the images, then all-gather), "
                        "auto (per module, whichever moves fewer bytes per step; default heads)")
    g.add_argument("--data-parallel-sharding", default=None, choices=["ddp", "fsdp", "hsdp"],
                   help="ddp: replicas; fsdp: FSDP2 ZeRO-3; hsdp: shard within groups, replicate across (default ddp)")
    g.add_argument("--use-distributed-optimizer", action="store_true", default=None,
                   help="Megatron's sharded optimizer; here = --data-parallel-sharding fsdp")
    g.add_argument("--num-distributed-optimizer-instances", type=int, default=None, help="hsdp: number of replicas")
    g.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true", default=None,
                   help="Megatron's flag: here the default (FSDP2 reduces each block as its backward ends)")
    g.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false", default=None,
                   help="DP: one FSDP2 unit per model part, so gradients are reduced after the whole backward and "
                        "parameters gathered whole before forward (default: per block, overlapped with compute)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=None,
                   help="timeout of every process group: a rank that stops answering makes the others fail "
                        "after this long, naming the collective (default 10; fractions allowed)")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint root; iterations go to SAVE/iter_0000100/ (no flags at "
                                                 "all, README command 1: runs/tiny/checkpoints)")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between saves (0: save at the end only)")
    g.add_argument("--load", default=None, help="checkpoint root (loads its latest) or one iteration directory")
    g.add_argument("--finetune", action="store_true", default=None, help="load model weights only; start at iteration 0")
    g.add_argument("--use-checkpoint-args", action="store_true", default=None,
                   help="the model config is the one --load (else --pretrained-checkpoint) was saved with, e.g. "
                        "an imported LLaMA's rms_norm_eps / rope_theta / rope scaling; --preset then picks the recipe only")
    g.add_argument("--no-load-optim", action="store_true", default=None, help="do not load optimizer / LR-scheduler state")
    g.add_argument("--no-load-rng", action="store_true", default=None, help="do not load RNG states")
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--async-save", action="store_true", default=None, help="write checkpoints in the background")
    g.add_argument("--ckpt-save-threads", type=int, default=None, help="writer threads per rank")
    g.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false", default=None,
                   help="--load without checking the files against the checkpoint's checksums.json")
    g.add_argument("--allow-checkpoint-rewind", action="store_true", default=None,
                   help="allow saving iteration N into a --save whose latest is above N (moves latest back)")


def add_failsafe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fail-safe and exit", "README: Running for days")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", default=None,
                   help="do not skip steps whose loss or grad norm is NaN/inf (default: skip)")
    g.add_argument("--max-skipped-iterations", type=int, default=None,
                   help="stop with an error after this many skipped steps in a row (default 10)")
    g.add_argument("--exit-signal-handler", action="store_true", default=None,
                   help="on SIGTERM or --exit-signal: finish the step, save a checkpoint, exit 0")
    g.add_argument("--exit-signal", default=None,
                   help="the signal SLURM sends before the time limit (sbatch --signal=B:USR1@120 -> SIGUSR1)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once the run has trained this many minutes")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 at the first iteration divisible by this")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validation loss every N iterations, on the --split valid samples (default: the "
                        "preset's recipe; 0 = never)")
    g.add_argument("--eval-iters", type=int, default=None, help="global batches per validation (default: recipe, 10)")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])


def add_performance_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance")
    g.add_argument("--attention-backend", default=None, choices=["auto", "flash", "te", "sdpa", "math"],
                   help="attention kernel; auto = fastest installed (flash-attn > TE > torch SDPA)")
    g.add_argument("--use-flash-attn", action="store_true", default=None, help="same as --attention-backend flash")
    g.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false", default=None,
                   help="plain torch RMSNorm / AdamW instead of apex / TE / torch fused kernels")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 compute, fp32 master weights and grad reduction")
    g.add_argument("--fp16", action="store_true", default=None, help="fp16 compute with loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=None)
    g.add_argument("--loss-scale-window", type=int, default=None)
    g.add_argument("--recompute-activations", action="store_true", default=None,
                   help="selective recompute: attention core and elementwise ops, keep matmul outputs")
    g.add_argument("--recompute-granularity", default=None, choices=["selective", "full"])
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recompute: the first N blocks of each transformer stack (default: all)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile each transformer block")
    g.add_argument("--compile-backend", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend: inductor generates kernels; aot_eager/eager trace the same "
                        "graphs without code generation (debugging)")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("instruction tuning (Emu-I)",
                                  "--lora-rank > 0: LoRA on the LLM's q, k, v, o, everything else frozen; "
                                  "[USER] / [ASSISTANT] tokens; loss on answers only; the Emu-I recipe")
    g.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (paper: 16; 0 = pretraining)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; updates scale by alpha / r (paper: 16)")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="the pretrained Emu to adapt (checkpoint root or iteration directory; its vocabulary grows "
                        "by [USER] / [ASSISTANT]); --save / --load then hold the adapters (+ optimizer) only")
    g.add_argument("--lora-merge", action="store_true", default=None,
                   help="fold the adapters into the base weights and save a full (merged) checkpoint to --save")


# Flag (argparse dest) -> the TrainConfig field it sets. Flags default to None: a flag not
# given leaves the field as the preset's recipe has it (config.recipe_config), and the
# recipe leaves the rest at the dataclasses' defaults: one source for every default.
FIELDS: dict[str, str] = {
    "l2_loss_weight": "l2_loss_weight", "train_iters": "train_iters", "seed": "seed", "log_interval": "log_interval",
    "eval_interval": "eval_interval", "eval_iters": "eval_iters", "device": "device",
    **{name: f"data.{name}" for name in ("data_path", "seq_length", "micro_batch_size", "global_batch_size",
                                        "num_workers", "prefetch_factor", "tokenizer_model", "data_blend",
                                        "pack_sequences", "split")},
    "data_cache_dir": "data.cache_dir",
    **{name: f"optimizer.{name}" for name in (
        "lr", "lr_vision", "lr_causal_former", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "freeze_vision", "freeze_causal_former",
        "freeze_llm", "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler")},
    **{name: f"parallel.{name}" for name in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel", "pipeline_schedule",
        "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
        "decoder_last_pipeline_num_layers", "pipeline_balance", "pipeline_balance_images_per_sample",
        "pipeline_balance_costs",
        "vision_tensor_parallel", "data_parallel_sharding", "num_distributed_optimizer_instances", "distributed_timeout_minutes",
        "overlap_grad_reduce")},
    **{name: f"checkpoint.{name}" for name in (
        "save", "save_interval", "load", "finetune", "no_load_optim", "no_load_rng", "keep_last", "async_save",
        "pretrained_checkpoint", "allow_checkpoint_rewind")},
    "ckpt_save_threads": "checkpoint.save_threads", "verify_checkpoint": "checkpoint.verify",
    **{name: f"performance.{name}" for name in (
        "attention_backend", "use_flash_attn", "fused_kernels", "bf16", "fp16", "loss_scale", "initial_loss_scale",
        "loss_scale_window", "recompute_granularity", "recompute_num_layers", "compile", "compile_backend")},
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_merge": "lora.merge",
    **{name: f"failsafe.{name}" for name in (
        "check_for_nan_in_loss_and_grad", "max_skipped_iterations", "exit_signal_handler", "exit_signal",
        "exit_duration_in_mins", "exit_interval")},
}
# Flags that are not one field: read by `flag_values` / `to_config` (the logging flags by logging_args.py).
COMPOSITE = {"preset", "make_vocab_size_divisible_by", "recompute_activations", "use_distributed_optimizer",
             "use_checkpoint_args"}


def flag_values(args: argparse.Namespace) -> dict:
    """{field path: value} of every flag given, with the flags that stand for a value resolved."""
    given = {FIELDS[name]: value for name, value in vars(args).items() if name in FIELDS and value is not None}
    if args.recompute_activations:  # Megatron's name for selective recompute
        if given.get("performance.recompute_granularity") == "full":
            raise ValueError("--recompute-activations (selective) conflicts with --recompute-granularity full")
        given["performance.recompute_granularity"] = "selective"
    if args.use_distributed_optimizer:  # Megatron's ZeRO-1/3 switch: our FSDP2 sharding
        sharding = given.get("parallel.data_parallel_sharding")
        if sharding not in (None, "fsdp"):
            raise ValueError(f"--use-distributed-optimizer means fsdp sharding, but --data-parallel-sharding {sharding} was given")
        given["parallel.data_parallel_sharding"] = "fsdp"
    if given.get("eval_interval") == 0:  # 0 = never
        given["eval_interval"] = None
    if "data.data_path" in given:
        given["data.data_path"] = list(given["data.data_path"])
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain Emu (EVA-CLIP -> Causal Former -> LLaMA).",
        epilog="Flags left unset take the preset's recipe (megatron_emu/config.py RECIPES), "
               "and fields no recipe sets their dataclass default.",
    )
    for add in (add_model_args, add_data_args, add_optimizer_args, add_parallel_args, add_checkpoint_args, add_training_args,
                add_performance_args, add_failsafe_args, add_logging_args, add_lora_args):
        add(parser)
    return parser


def to_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's recipe, then every flag given (an explicit flag always wins)."""
    config = recipe_config(args.preset, instruct=(args.lora_rank or 0) > 0)
    config = with_fields(config, flag_values(args))
    model = checkpoint_model_config(config) if args.use_checkpoint_args else config.model
    return dataclasses.replace(config, model=padded_vocab(model, args.make_vocab_size_divisible_by),
                               logging=logging_config(args))


def checkpoint_model_config(config: TrainConfig) -> ModelConfig:
    """--use-checkpoint-args: the model config --load (else --pretrained-checkpoint) was saved
    with; instruction tuning adds [USER] / [ASSISTANT] to its vocabulary."""
    from megatron_emu.training.checkpoint_files import recorded_model_config

    path = config.checkpoint.load or config.checkpoint.pretrained_checkpoint
    if not path:
        raise ValueError("--use-checkpoint-args takes the model config from --load or --pretrained-checkpoint: give one")
    model = recorded_model_config(path)
    if config.lora.enabled:
        model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_special_tokens=NUM_INSTRUCT_SPECIAL_TOKENS))
    return model


def padded_vocab(model: ModelConfig, make_vocab_size_divisible_by: int | None) -> ModelConfig:
    """--make-vocab-size-divisible-by."""
    if make_vocab_size_divisible_by is None:
        return model
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    return dataclasses.replace(model, llm=dataclasses.replace(model.llm, make_vocab_size_divisible_by=make_vocab_size_divisible_by))


# README command 1, `python pretrain_emu.py` with no flags at all, keeps its final checkpoint here
# for the walkthrough that follows it (README "After command 1"); running it again replaces it.
# With any flag a run saves only with --save, as in Megatron-LM.
DEMO_SAVE = "runs/tiny/checkpoints"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if not argv:
        args.save, args.allow_checkpoint_rewind = DEMO_SAVE, True  # a rerun starts at 0 over the last one's 300
    return to_config(args)
