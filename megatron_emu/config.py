"""Typed configuration: the run's settings, one small dataclass per concern, and the recipes;
model sizes and presets live in model_config.py and are re-exported here. Megatron flag
names map onto these dataclasses in one place, `megatron_emu/arguments.py`.

One source of defaults: a field's default is its dataclass's; a preset's recipe (RECIPES)
replaces some of them (recipe_config); a flag given on the command line replaces one more.
Flags have no defaults of their own. Each dataclass checks its own values (__post_init__);
sizes that depend on the world size are checked by parallel/mesh.py's ParallelDims.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field

from megatron_emu.model_config import (  # noqa: F401 (re-exported: config.py is the one import)
    LLAMA_FUNCTION_FIELDS,
    NUM_INSTRUCT_SPECIAL_TOKENS,
    NUM_PRETRAIN_SPECIAL_TOKENS,
    PRESETS,
    SPECIAL_TOKEN_NAMES,
    CausalFormerConfig,
    LLaMAConfig,
    ModelConfig,
    SpecialTokens,
    VisionConfig,
    get_preset,
)


# ---------------------------------------------------------------------------
# Run settings: one small dataclass per concern (STYLE.md, "For megatron_emu" 4).
# ---------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    # Megatron style: [W1, PREFIX1, W2, PREFIX2, ...]; empty = the bundled synthetic corpus.
    data_path: list[str] = field(default_factory=list)
    seq_length: int = 1024
    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_workers: int = 1  # DataLoader worker processes (0: load in the training process)
    # Where the synthetic corpus and the tiny tokenizer are built and cached.
    cache_dir: str = ""
    tokenizer_model: str = ""  # sentencepiece .model; empty = tiny tokenizer built on demand
    # "shares": --data-path weights are exact per-global-batch shares (the paper's recipe);
    # "weighted": megatron-core BlendedDataset-style greedy blending of the sample stream.
    data_blend: str = "shares"
    prefetch_factor: int = 2  # micro-batches prefetched per DataLoader worker
    # Pack each micro-batch's samples into as few seq_length rows as hold them, with
    # per-document attention and positions (data/packing.py); off = one sample per row.
    pack_sequences: bool = False
    # Megatron's --split "train,valid,test" weights over each dataset's samples (contiguous
    # ranges); "" = every sample trains, no validation data.
    split: str = ""


@dataclass
class OptimizerConfig:
    """AdamW with per-module learning rates and a warmup + decay schedule (spec section 5)."""

    lr: float = 3e-5  # the LLaMA rate; other modules default to it unless set
    lr_vision: float | None = None
    lr_causal_former: float | None = None
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: int | None = None  # default: train_iters
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    clip_grad: float = 1.0
    freeze_vision: bool = False
    freeze_causal_former: bool = False
    freeze_llm: bool = False
    # A resumed run whose schedule flags differ from the checkpoint's is refused unless one of
    # these says which wins (Megatron's names): the flags, or the checkpoint's settings.
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False

    def __post_init__(self) -> None:
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually exclusive")


@dataclass
class ParallelConfig:
    """Sizes of the (pp, dp, tp) mesh and how each dimension is used.

    The data-parallel size is not set: it is world size / (TP x PP). Validation of all
    sizes happens once, in megatron_emu/parallel/mesh.py (ParallelDims).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # shard norm/residual regions of LLaMA along the sequence (needs TP > 1)
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved | zero-bubble
    num_layers_per_virtual_pipeline_stage: int | None = None  # interleaved: LLaMA layers per virtual stage
    decoder_first_pipeline_num_layers: int | None = None  # LLaMA layers on the first (multimodal) stage
    decoder_last_pipeline_num_layers: int | None = None  # LLaMA layers on the last stage
    pipeline_balance: str = "even"  # even | auto (LLaMA layers placed by stage cost, parallel/balance.py)
    # auto: images (video frames) per sample of the data mix. The paper's per-step mix, LAION-2B 128 +
    # LAION-COCO 128 pairs at 1 image, MMC4 64 at ~3 per 1024-token chunk (up to 5), WebVid 16 +
    # YT-Storyboard 16 at 8 frames: (256 + 64 * 3 + 32 * 8) / 352 = 2.0.
    pipeline_balance_images_per_sample: float = 2.0
    # auto: measured per-block times (parallel/block_costs.py) instead of FLOPs; "" = FLOPs.
    pipeline_balance_costs: str = ""
    # TP placement of the ViT and Causal Former: heads (split heads where TP divides them) | images
    # (replicated, each TP rank encodes 1/TP of the images) | auto (per module, fewer bytes moved).
    vision_tensor_parallel: str = "heads"
    data_parallel_sharding: str = "ddp"  # ddp | fsdp (ZeRO-3, FSDP2) | hsdp (shard inside groups, replicate across)
    num_distributed_optimizer_instances: int = 1  # hsdp: number of replicas (the rest of DP shards)
    # Every transformer block its own FSDP2 unit: gradients reduced block by block during
    # backward, parameters gathered block by block (prefetched). False: one unit per model
    # part, gathered whole before forward and reduced after the whole backward (for comparison).
    overlap_grad_reduce: bool = True
    # Every process group's timeout: a rank that stops answering fails the others after this long.
    distributed_timeout_minutes: float = 10.0


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints (megatron_emu/training/checkpoint.py), Megatron flag names."""

    save: str = ""  # root directory; iterations go to SAVE/iter_0000100/
    save_interval: int = 0  # iterations between saves (0 = only at the end when --save is set)
    load: str = ""  # root directory (its latest) or one iteration directory
    finetune: bool = False  # load the model only; iteration, optimizer, RNG, data start fresh
    no_load_optim: bool = False  # skip optimizer and LR-scheduler state
    no_load_rng: bool = False
    keep_last: int = 0  # prune all but the newest N iterations after a save (0 = keep all)
    async_save: bool = False  # write in a background thread while training goes on
    save_threads: int = 1  # writer threads per rank
    verify: bool = True  # check the files against checksums.json before loading (--no-verify-checkpoint: skip)
    # Saving iteration N where --save's latest is above N would move `latest` backwards.
    allow_checkpoint_rewind: bool = False
    # Instruction tuning: the frozen base (root or iteration dir); --save / --load then hold adapters only.
    pretrained_checkpoint: str = ""

    def __post_init__(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0 or self.save_threads < 1:
            raise ValueError("--save-interval and --keep-last must be >= 0, --ckpt-save-threads >= 1")


@dataclass
class FailsafeConfig:
    """How a long run treats bad steps and how it stops (training/failsafe.py, training/signals.py)."""

    check_for_nan_in_loss_and_grad: bool = True  # skip a step whose loss or grad norm is not finite
    max_skipped_iterations: int = 10  # consecutive skipped steps before the run stops with an error
    exit_signal_handler: bool = False  # on SIGTERM / exit_signal: finish the step, save, exit 0
    exit_signal: str = "SIGTERM"  # e.g. SIGUSR1 for sbatch --signal=B:USR1@120
    exit_duration_in_mins: float | None = None  # save and exit 0 after this much wall time
    exit_interval: int | None = None  # save and exit 0 at the first iteration divisible by this

    def __post_init__(self) -> None:
        if not hasattr(signal, self.exit_signal) or not self.exit_signal.startswith("SIG"):
            raise ValueError(f"--exit-signal {self.exit_signal!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        if self.max_skipped_iterations < 1:
            raise ValueError(f"--max-skipped-iterations must be >= 1, got {self.max_skipped_iterations}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError(f"--exit-interval must be >= 1, got {self.exit_interval}")


@dataclass
class LoRAConfig:
    """Emu-I instruction tuning (paper section 4): LoRA on the LLM's q, k, v, o, all else
    frozen; [USER] / [ASSISTANT] added (vocabulary base + 6); the loss on answers only.
    rank 0 = off (pretraining)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    merge: bool = False  # --lora-merge: fold the adapters into the base and save a full checkpoint

    def __post_init__(self) -> None:
        if self.merge and self.rank <= 0:
            raise ValueError("--lora-merge needs the adapters' --lora-rank")
        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-rank must be >= 0, --lora-alpha > 0, --lora-dropout in [0, 1); "
                             f"got {self.rank}, {self.alpha}, {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class LoggingConfig:
    """Where a run's scalars go besides the log line, and what is timed (training/monitor.py,
    training/timers.py). Megatron-LM's flag names."""

    tensorboard_dir: str = ""  # "" = no TensorBoard
    tensorboard_log_interval: int = 1  # iterations between per-step scalars
    tensorboard_queue_size: int = 1000  # events buffered before the writer flushes
    log_validation_ppl_to_tensorboard: bool = False
    log_timers_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    wandb_project: str = ""  # "" = no Weights & Biases
    wandb_exp_name: str = ""
    wandb_save_dir: str = ""
    # 0: no per-phase timers (nothing added to the step); 1: min/max over ranks; 2: every rank.
    timing_log_level: int = 0
    barrier_with_l1_time: bool = True  # barrier before each timed phase: waits for other ranks stay out
    log_straggler: bool = False
    straggler_threshold: float = 10.0  # percent above the median step time
    straggler_interval: int | None = None  # iterations between reports (None: --log-interval)

    def __post_init__(self) -> None:
        if self.timing_log_level not in (0, 1, 2):
            raise ValueError(f"--timing-log-level must be 0, 1 or 2, got {self.timing_log_level}")
        if self.tensorboard_log_interval < 1 or self.tensorboard_queue_size < 1:
            raise ValueError("--tensorboard-log-interval and --tensorboard-queue-size must be >= 1")
        if self.log_straggler and self.timing_log_level == 0:
            raise ValueError("--log-straggler needs --timing-log-level 1 or 2: a rank's step time is the sum "
                             "of its timed phases (waits for other ranks excluded)")
        if self.straggler_interval is not None and self.straggler_interval < 1:
            raise ValueError(f"--straggler-interval must be >= 1, got {self.straggler_interval}")

    @property
    def has_sink(self) -> bool:
        return bool(self.tensorboard_dir or self.wandb_project)


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; filled from Megatron-style flags."""

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    performance: "PerformanceConfig" = field(default_factory=lambda: PerformanceConfig())
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    failsafe: FailsafeConfig = field(default_factory=FailsafeConfig)
    train_iters: int = 300
    l2_loss_weight: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int | None = None  # validation loss every N iterations (needs a valid split)
    eval_iters: int = 10  # global batches per validation
    device: str = "auto"  # auto | cpu | cuda


# The recipes: per preset, the fields of TrainConfig that differ from its defaults, keyed
# by field path ("section.field", or a top-level field). `recipe_config` turns one into the
# TrainConfig a run starts from; a flag given on the command line then replaces its field
# (arguments.py). emu-14b is the paper's recipe (spec section 5); the global batch is the
# sum of the per-dataset shares 128 + 128 + 64 + 16 + 16. tiny is tuned so the README's
# first command shows both losses falling on one CPU within a few minutes.
RECIPES: dict[str, dict] = {
    "tiny": {
        "optimizer.lr": 2e-3, "optimizer.lr_vision": 2e-3, "optimizer.lr_causal_former": 2e-3,
        "optimizer.min_lr": 1e-4, "optimizer.lr_warmup_iters": 20, "optimizer.weight_decay": 0.01,
        "train_iters": 300, "data.seq_length": 160, "data.micro_batch_size": 8, "data.global_batch_size": 16,
        "data.split": "98,2,0", "eval_interval": 100, "eval_iters": 2,
    },
    "1b": {
        "optimizer.lr": 3e-4, "optimizer.lr_vision": 1e-4, "optimizer.lr_causal_former": 3e-4,
        "optimizer.min_lr": 3e-5, "optimizer.lr_warmup_iters": 500, "optimizer.weight_decay": 0.05,
        "train_iters": 10000, "data.seq_length": 1024, "data.micro_batch_size": 4, "data.global_batch_size": 64,
    },
    "emu-14b": {
        "optimizer.lr": 3e-5, "optimizer.lr_vision": 4e-5, "optimizer.lr_causal_former": 1e-4,
        "optimizer.min_lr": 0.0, "optimizer.lr_warmup_iters": 2000, "optimizer.weight_decay": 0.05,
        "train_iters": 10000, "data.seq_length": 1024, "data.micro_batch_size": 1, "data.global_batch_size": 352,
    },
}


# Instruction tuning (--lora-rank > 0) overrides the preset's recipe with these.
# emu-14b: the paper's Emu-I recipe (section 4): batch 128, 10k steps, LR warmed up linearly
# over 500 steps to 1e-5, then cosine to 0; 16 A100-80G (examples/finetune_instruct_emu14b.sbatch).
_INSTRUCT_COMMON = {"optimizer.min_lr": 0.0, "optimizer.weight_decay": 0.0, "data.split": "", "eval_interval": None}
INSTRUCT_RECIPES: dict[str, dict] = {
    "tiny": {**_INSTRUCT_COMMON, "optimizer.lr": 1e-2, "optimizer.lr_warmup_iters": 2, "train_iters": 30,
             "data.seq_length": 128, "data.micro_batch_size": 4, "data.global_batch_size": 8, "eval_iters": 1},
    "1b": {**_INSTRUCT_COMMON, "optimizer.lr": 1e-4, "optimizer.lr_warmup_iters": 500, "train_iters": 10000,
           "data.seq_length": 1024, "data.micro_batch_size": 4, "data.global_batch_size": 128, "eval_iters": 10},
    "emu-14b": {**_INSTRUCT_COMMON, "optimizer.lr": 1e-5, "optimizer.lr_warmup_iters": 500, "train_iters": 10000,
                "data.seq_length": 1024, "data.micro_batch_size": 1, "data.global_batch_size": 128,
                "eval_iters": 10},
}


def with_fields(config: "TrainConfig", values: dict) -> "TrainConfig":
    """`config` with the fields at these paths replaced; each section is rebuilt once, so its
    checks (__post_init__) see all of its new values together."""
    sections: dict[str, dict] = {}
    for path, value in values.items():
        section, _, name = path.rpartition(".")
        sections.setdefault(section, {})[name] = value
    top = sections.pop("", {})
    for section, fields in sections.items():
        if section not in {f.name for f in dataclasses.fields(config)}:
            raise ValueError(f"unknown configuration section {section!r} (in {sorted(fields)})")
        top[section] = dataclasses.replace(getattr(config, section), **fields)
    return dataclasses.replace(config, **top)


def recipe_config(preset: str, instruct: bool = False) -> "TrainConfig":
    """The TrainConfig of `preset`'s recipe (INSTRUCT_RECIPES on top for instruction tuning,
    whose vocabulary adds [USER] / [ASSISTANT]): what pretrain_emu.py runs without flags."""
    model = get_preset(preset)
    if instruct:
        model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_special_tokens=NUM_INSTRUCT_SPECIAL_TOKENS))
    recipe = {**RECIPES[preset], **(INSTRUCT_RECIPES[preset] if instruct else {})}
    return with_fields(TrainConfig(preset=preset, model=model), recipe)


@dataclass
class PerformanceConfig:
    """Kernels, precision, activation recompute and compile (README_performance.md)."""

    attention_backend: str = "auto"  # auto | flash | te | sdpa | math (model/attention.py)
    use_flash_attn: bool = False  # Megatron's name for --attention-backend flash
    fused_kernels: bool = True  # fused RMSNorm / AdamW (megatron_emu/kernels.py)
    bf16: bool = False  # bf16 compute; fp32 master weights and gradient reduction
    fp16: bool = False  # fp16 compute with loss scaling
    loss_scale: float | None = None  # static fp16 loss scale; None = dynamic
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000  # good steps before the dynamic scale doubles
    recompute_granularity: str | None = None  # None | selective | full
    recompute_num_layers: int | None = None  # full: first N blocks of each stack; None = all
    compile: bool = False  # torch.compile each transformer block
    # inductor (generates kernels); aot_eager / eager trace the same graphs without codegen.
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are mutually exclusive")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"--recompute-granularity must be selective or full, got {self.recompute_granularity!r}")
        if self.recompute_num_layers is not None and self.recompute_granularity != "full":
            raise ValueError("--recompute-num-layers needs --recompute-granularity full")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 0:
            raise ValueError(f"--recompute-num-layers must be >= 0, got {self.recompute_num_layers}")

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"
