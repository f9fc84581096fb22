"""Megatron-LM flag names -> the typed dataclasses of config.py, in one place.

Each concern adds its flags in its own function and reads them back in `to_config`.
"""

import argparse
import dataclasses
import signal

from megatron_emu.config import (
    CheckpointConfig,
    DataConfig,
    FailsafeConfig,
    INSTRUCT_RECIPES,
    LoRAConfig,
    NUM_INSTRUCT_SPECIAL_TOKENS,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PerformanceConfig,
    PRESETS,
    RECIPES,
    TrainConfig,
    get_preset,
)
from megatron_emu.logging_args import add_logging_args, logging_config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    g.add_argument("--l2-loss-weight", type=float, default=1.0, help="lambda in CE + lambda * l2")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the embedding/LM-head rows to a multiple of this (Megatron; e.g. 128 so TP=8 "
                        "splits them); padded ids are never predicted (default: the preset's, 1 = unpadded)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="W1 PREFIX1 W2 PREFIX2 ...; none = synthetic corpus")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's recipe)")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    g.add_argument("--data-cache-dir", default="", help="where the synthetic corpus/tokenizer are cached")
    g.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: tiny tokenizer)")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack each micro-batch's samples into as few --seq-length rows as hold them; attention, "
                        "positions and targets stay within each sample (no compute spent on padding)")
    g.add_argument("--split", default=None,
                   help="train,valid,test weights over each dataset's samples, e.g. 969,30,1 (Megatron); "
                        "default: the preset's recipe (tiny: 98,2,0; others: all train)")
    g.add_argument("--data-blend", default="shares", choices=["shares", "weighted"],
                   help="shares: --data-path weights are exact per-global-batch shares (the paper); "
                        "weighted: megatron-core's greedy weighted blending")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=None, help="peak LR of the LLM (paper: 3e-5)")
    g.add_argument("--lr-vision", type=float, default=None, help="peak LR of EVA-CLIP (paper: 4e-5)")
    g.add_argument("--lr-causal-former", type=float, default=None, help="peak LR of Causal Former + regression head (paper: 1e-4)")
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    g.add_argument("--freeze-vision", action="store_true")
    g.add_argument("--freeze-causal-former", action="store_true")
    g.add_argument("--freeze-llm", action="store_true")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR schedule (--lr, --min-lr, warmup, decay, per-module LRs, "
                        "--weight-decay) from the flags, not from the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR schedule from the checkpoint, whatever the flags say")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism", "data-parallel size = world size / (TP x PP)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: split heads/FFN/vocab over ranks")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: split LLaMA layers into stages")
    g.add_argument("--sequence-parallel", action="store_true", help="shard LLaMA norms/residuals along the sequence (TP > 1)")
    g.add_argument("--pipeline-schedule", default="1f1b", choices=["1f1b", "interleaved", "zero-bubble"])
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved schedule: LLaMA layers per virtual stage")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="LLaMA layers on the first stage (which also holds the ViT and Causal Former)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, help="LLaMA layers on the last stage")
    g.add_argument("--pipeline-balance", default="even", choices=["even", "auto"],
                   help="even: LLaMA layers split evenly (after the ends above); auto: placed so that every stage's "
                        "forward + backward FLOPs, ViT and Causal Former on the first and heads on the last, are "
                        "as equal as whole layers allow")
    g.add_argument("--pipeline-balance-images-per-sample", type=float, default=2.0,
                   help="auto: images (and video frames) per sample of the data mix (default 2, the paper's mix)")
    g.add_argument("--vision-tensor-parallel", default="heads", choices=["heads", "images", "auto"],
                   help="TP placement of the ViT and Causal Former: heads (split heads where TP divides them, else "
                        "replicate), images (replicate; each TP rank encodes 1/TP of the images, then all-gather), "
                        "auto (per module, whichever moves fewer bytes per step)")
    g.add_argument("--data-parallel-sharding", default=None, choices=["ddp", "fsdp", "hsdp"],
                   help="ddp: replicas; fsdp: FSDP2 ZeRO-3; hsdp: shard within groups, replicate across (default ddp)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron's sharded optimizer; here = --data-parallel-sharding fsdp")
    g.add_argument("--num-distributed-optimizer-instances", type=int, default=1, help="hsdp: number of replicas")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="timeout of every process group: a rank that stops answering makes the others fail "
                        "after this long, naming the collective (default 10; fractions allowed)")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default="", help="checkpoint root; iterations go to SAVE/iter_0000100/")
    g.add_argument("--save-interval", type=int, default=0, help="iterations between saves (0: save at the end only)")
    g.add_argument("--load", default="", help="checkpoint root (loads its latest) or one iteration directory")
    g.add_argument("--finetune", action="store_true", help="load model weights only; start at iteration 0")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="the model config is the one --load (else --pretrained-checkpoint) was saved with, e.g. "
                        "an imported LLaMA's rms_norm_eps / rope_theta / rope scaling; --preset then picks the recipe only")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer / LR-scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    g.add_argument("--ckpt-save-threads", type=int, default=1, help="writer threads per rank")
    g.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                   help="--load without checking the files against the checkpoint's checksums.json")
    g.add_argument("--allow-checkpoint-rewind", action="store_true",
                   help="allow saving iteration N into a --save whose latest is above N (moves latest back)")


def add_failsafe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fail-safe and exit", "README: Running for days")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="do not skip steps whose loss or grad norm is NaN/inf (default: skip)")
    g.add_argument("--max-skipped-iterations", type=int, default=10,
                   help="stop with an error after this many skipped steps in a row (default 10)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or --exit-signal: finish the step, save a checkpoint, exit 0")
    g.add_argument("--exit-signal", default="SIGTERM",
                   help="the signal SLURM sends before the time limit (sbatch --signal=B:USR1@120 -> SIGUSR1)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once the run has trained this many minutes")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 at the first iteration divisible by this")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validation loss every N iterations, on the --split valid samples (default: the "
                        "preset's recipe; 0 = never)")
    g.add_argument("--eval-iters", type=int, default=None, help="global batches per validation (default: recipe, 10)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_performance_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "te", "sdpa", "math"],
                   help="attention kernel; auto = fastest installed (flash-attn > TE > torch SDPA)")
    g.add_argument("--use-flash-attn", action="store_true", help="same as --attention-backend flash")
    g.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="plain torch RMSNorm / AdamW instead of apex / TE / torch fused kernels")
    g.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights and grad reduction")
    g.add_argument("--fp16", action="store_true", help="fp16 compute with loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**16)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recompute: attention core and elementwise ops, keep matmul outputs")
    g.add_argument("--recompute-granularity", default=None, choices=["selective", "full"])
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recompute: the first N blocks of each transformer stack (default: all)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend: inductor generates kernels; aot_eager/eager trace the same "
                        "graphs without code generation (debugging)")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("instruction tuning (Emu-I)",
                                  "--lora-rank > 0: LoRA on the LLM's q, k, v, o, everything else frozen; "
                                  "[USER] / [ASSISTANT] tokens; loss on answers only; the Emu-I recipe")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (paper: 16; 0 = pretraining)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; updates scale by alpha / r (paper: 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--pretrained-checkpoint", default="",
                   help="the pretrained Emu to adapt (checkpoint root or iteration directory; its vocabulary grows "
                        "by [USER] / [ASSISTANT]); --save / --load then hold the adapters (+ optimizer) only")
    g.add_argument("--lora-merge", action="store_true",
                   help="fold the adapters into the base weights and save a full (merged) checkpoint to --save")


def lora_config(args: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, merge=args.lora_merge)


def performance_config(args: argparse.Namespace) -> PerformanceConfig:
    granularity = args.recompute_granularity
    if args.recompute_activations:
        if granularity == "full":
            raise ValueError("--recompute-activations (selective) conflicts with --recompute-granularity full")
        granularity = "selective"
    return PerformanceConfig(
        attention_backend=args.attention_backend,
        use_flash_attn=args.use_flash_attn,
        fused_kernels=args.fused_kernels,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        loss_scale_window=args.loss_scale_window,
        recompute_granularity=granularity,
        recompute_num_layers=args.recompute_num_layers,
        compile=args.compile,
        compile_backend=args.compile_backend,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain Emu (EVA-CLIP -> Causal Former -> LLaMA).",
        epilog="Flags left unset take the preset's recipe (megatron_emu/config.py RECIPES).",
    )
    for add in (add_model_args, add_data_args, add_optimizer_args, add_parallel_args, add_checkpoint_args, add_training_args,
                add_performance_args, add_failsafe_args, add_logging_args, add_lora_args):
        add(parser)
    return parser


def fill_recipe_defaults(args: argparse.Namespace) -> None:
    """Flags left unset take the preset's recipe value (config.RECIPES; INSTRUCT_RECIPES
    when instruction tuning)."""
    recipe = {**RECIPES[args.preset], **(INSTRUCT_RECIPES[args.preset] if args.lora_rank > 0 else {})}
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def to_config(args: argparse.Namespace) -> TrainConfig:
    fill_recipe_defaults(args)
    return TrainConfig(
        preset=args.preset,
        model=model_config(args),
        data=DataConfig(
            data_path=list(args.data_path),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            num_workers=args.num_workers,
            cache_dir=args.data_cache_dir,
            tokenizer_model=args.tokenizer_model,
            data_blend=args.data_blend,
            pack_sequences=args.pack_sequences,
            split=args.split or "",
        ),
        optimizer=OptimizerConfig(
            lr=args.lr,
            lr_vision=args.lr_vision,
            lr_causal_former=args.lr_causal_former,
            min_lr=args.min_lr,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_style=args.lr_decay_style,
            lr_decay_iters=args.lr_decay_iters,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            freeze_vision=args.freeze_vision,
            freeze_causal_former=args.freeze_causal_former,
            freeze_llm=args.freeze_llm,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        ),
        parallel=parallel_config(args),
        checkpoint=checkpoint_config(args),
        performance=performance_config(args),
        lora=lora_config(args),
        logging=logging_config(args),
        failsafe=failsafe_config(args),
        train_iters=args.train_iters,
        l2_loss_weight=args.l2_loss_weight,
        seed=args.seed,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval or None,  # 0 = never
        eval_iters=args.eval_iters,
        device=args.device,
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    model = checkpoint_model_config(args) if args.use_checkpoint_args else get_preset(args.preset)
    if args.lora_rank > 0:  # [USER] and [ASSISTANT] join the vocabulary
        model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_special_tokens=NUM_INSTRUCT_SPECIAL_TOKENS))
    multiple = args.make_vocab_size_divisible_by
    if multiple is None:
        return model
    if multiple < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {multiple}")
    return dataclasses.replace(model, llm=dataclasses.replace(model.llm, make_vocab_size_divisible_by=multiple))


def checkpoint_model_config(args: argparse.Namespace) -> ModelConfig:
    from megatron_emu.training.checkpoint_files import recorded_model_config

    path = args.load or args.pretrained_checkpoint
    if not path:
        raise ValueError("--use-checkpoint-args takes the model config from --load or --pretrained-checkpoint: give one")
    return recorded_model_config(path)


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    if args.save_interval < 0 or args.keep_last < 0 or args.ckpt_save_threads < 1:
        raise ValueError("--save-interval and --keep-last must be >= 0, --ckpt-save-threads >= 1")
    return CheckpointConfig(
        save=args.save,
        save_interval=args.save_interval,
        load=args.load,
        finetune=args.finetune,
        no_load_optim=args.no_load_optim,
        no_load_rng=args.no_load_rng,
        keep_last=args.keep_last,
        async_save=args.async_save,
        save_threads=args.ckpt_save_threads,
        pretrained_checkpoint=args.pretrained_checkpoint,
        verify=args.verify_checkpoint,
        allow_checkpoint_rewind=args.allow_checkpoint_rewind,
    )


def failsafe_config(args: argparse.Namespace) -> FailsafeConfig:
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually exclusive")
    if not hasattr(signal, args.exit_signal) or not args.exit_signal.startswith("SIG"):
        raise ValueError(f"--exit-signal {args.exit_signal!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    if args.max_skipped_iterations < 1:
        raise ValueError(f"--max-skipped-iterations must be >= 1, got {args.max_skipped_iterations}")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ValueError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    return FailsafeConfig(
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
        max_skipped_iterations=args.max_skipped_iterations,
        exit_signal_handler=args.exit_signal_handler,
        exit_signal=args.exit_signal,
        exit_duration_in_mins=args.exit_duration_in_mins,
        exit_interval=args.exit_interval,
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    sharding = args.data_parallel_sharding
    if args.use_distributed_optimizer:
        if sharding not in (None, "fsdp"):
            raise ValueError(f"--use-distributed-optimizer means fsdp sharding, but --data-parallel-sharding {sharding} was given")
        sharding = "fsdp"
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        pipeline_schedule=args.pipeline_schedule,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        pipeline_balance=args.pipeline_balance,
        pipeline_balance_images_per_sample=args.pipeline_balance_images_per_sample,
        vision_tensor_parallel=args.vision_tensor_parallel,
        data_parallel_sharding=sharding or "ddp",
        num_distributed_optimizer_instances=args.num_distributed_optimizer_instances,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return to_config(build_parser().parse_args(argv))
