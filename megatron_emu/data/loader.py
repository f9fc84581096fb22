"""The training loop's data source: micro-batches for one data-parallel rank.

Global batch b has global_batch_size slots (blend.BatchPlan). DP rank r owns slots
[r * G/dp, (r + 1) * G/dp), cut into num_microbatches micro-batches of micro_batch_size.
Micro-batch m of this rank is a pure function of (seed, m), so the loader state is one
counter; torch DataLoader workers build whole micro-batches (reading, image unpacking and
collation happen in the workers). With --pack-sequences the micro-batch's samples are the
same, packed into at most micro_batch_size rows (data/packing.py).

With an empty data.data_path, the bundled synthetic corpus is built once through the
preprocess code path (the same one as tools/preprocess_data.py) and cached.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_emu.config import DataConfig
from megatron_emu.data.blend import BatchPlan, parse_data_path, parse_split, sample_index, split_range
from megatron_emu.data.indexed import MultimodalIndexed, _check_files, read_meta
from megatron_emu.data.locks import default_cache_dir, file_lock, publish
from megatron_emu.data.packing import collate_packed
from megatron_emu.data.samples import SeqSpec, collate, make_view

# The paper's per-step shares (LAION-2B + LAION-COCO 256, MMC4 64, videos 16 + 16) -> 8 : 2 : 1.
SYNTHETIC_WEIGHTS = {"pairs": 8, "interleaved": 2, "video": 1}


class MicroBatches(Dataset):
    """Map-style: micro-batch number m (of this rank) -> collated dict."""

    def __init__(self, views, plan: BatchPlan, spec: SeqSpec, *, dp_rank: int, dp_size: int,
                 micro_batch_size: int, seed: int, pack: bool = False):
        self.views, self.plan, self.spec, self.seed = views, plan, spec, seed
        self.collate = collate_packed if pack else collate
        self.micro = micro_batch_size
        self.per_rank = plan.global_batch_size // dp_size
        self.num_micro = self.per_rank // micro_batch_size
        self.rank_offset = dp_rank * self.per_rank

    def slots(self, m: int) -> list[tuple[int, int]]:
        b, k = divmod(m, self.num_micro)
        first = self.rank_offset + k * self.micro
        return self.plan.batch(b)[first:first + self.micro]

    def __getitem__(self, m: int) -> dict:
        samples = []
        for d, draw in self.slots(m):
            view = self.views[d]
            idx = sample_index(self.seed, d, draw, len(view))
            samples.append(view.build(idx, (self.seed, d, draw)))
        return self.collate(samples, self.spec)

    def __len__(self) -> int:  # unbounded stream; DataLoader only needs the sampler
        return 2 ** 62


class SplitView:
    """Samples [start, stop) of a view: one split (--split) of a dataset."""

    def __init__(self, view, start: int, stop: int):
        self.view, self.start, self.stop = view, start, stop
        self.kind = view.kind

    def __len__(self) -> int:
        return self.stop - self.start

    def build(self, index: int, key: tuple):
        return self.view.build(self.start + index, key)


class _From(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        m = self.start
        while True:
            yield m
            m += 1


class PretrainLoader:
    """Iterator over this rank's micro-batches; state_dict()/load_state_dict() resume exactly."""

    def __init__(self, dataset: MicroBatches, num_workers: int, prefetch_factor: int, start: int):
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self.consumed_microbatches = start
        # Data a view could not place, summed over this rank's batches (never silent).
        self.totals = {"truncated_tokens": 0, "dropped_images": 0}
        self._it = None

    @property
    def num_microbatches(self) -> int:
        return self.dataset.num_micro

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by all ranks together (Megatron's consumed_samples)."""
        b, k = divmod(self.consumed_microbatches, self.dataset.num_micro)
        return b * self.dataset.plan.global_batch_size + k * self.dataset.micro * (
            self.dataset.plan.global_batch_size // self.dataset.per_rank)

    def _iterator(self):
        workers = self.num_workers
        loader = DataLoader(
            self.dataset, batch_size=None, sampler=_From(self.consumed_microbatches), num_workers=workers,
            pin_memory=torch.cuda.is_available(), prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=False,
        )
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._iterator()
        try:
            batch = next(self._it)
        except ValueError as e:  # a bad stored sample: its one line, not a worker's traceback
            raise ValueError(_worker_error_line(str(e))) from None
        self.consumed_microbatches += 1
        for key in self.totals:
            self.totals[key] += int(batch[key])
        return batch

    def state_dict(self) -> dict:
        return {"consumed_microbatches": self.consumed_microbatches, "seed": self.dataset.seed,
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses {self.dataset.seed}")
        self.consumed_microbatches = int(state["consumed_microbatches"])
        self.totals.update(state.get("totals", {}))
        self._it = None  # restart the workers at the restored position


def _worker_error_line(message: str) -> str:
    """torch re-raises a DataLoader worker's ValueError as 'Caught ValueError in DataLoader
    worker process N.' + the worker's traceback; the error's own line is the last one."""
    if not message.startswith("Caught ValueError"):
        return message
    last = message.rstrip().splitlines()[-1]
    return last[len("ValueError: "):] if last.startswith("ValueError: ") else last


def build_pretrain_loader(data: DataConfig, tokenizer, *, dp_rank: int, dp_size: int, seed: int,
                          tokens_per_image: int = 34, consumed_samples: int = 0, split: str = "train") -> PretrainLoader:
    """This DP rank's micro-batches of one split (--split) of every --data-path dataset."""
    g, mbs = data.global_batch_size, data.micro_batch_size
    if g % (mbs * dp_size):
        raise ValueError(f"global batch {g} is not a multiple of micro batch {mbs} x data-parallel size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
    if data.seq_length < tokens_per_image + 2:
        raise ValueError(f"seq_length {data.seq_length} cannot hold one image ({tokens_per_image} tokens + BOS/EOS)")
    data_path = list(data.data_path) or ensure_synthetic_corpus(data.cache_dir, tokenizer)
    spec = SeqSpec.from_tokenizer(tokenizer, data.seq_length, tokens_per_image)
    weights, views = [], []
    fractions = parse_split(data.split)
    for weight, prefix in parse_data_path(data_path):
        prefix, view = _split_view(prefix)
        ds = MultimodalIndexed(prefix, tokenizer.fingerprint, tokenizer.vocab_size)
        whole = make_view(ds, spec, view, data.cache_dir)
        if len(whole) == 0:
            raise ValueError(f"{prefix}.idx: no samples for view {view or ds.kind}")
        views.append(SplitView(whole, *split_range(len(whole), fractions, split)))
        if len(views[-1]) == 0:
            raise ValueError(f"{prefix}.idx: the {split} split (--split {data.split or '1,0,0'}) of its "
                             f"{len(whole)} samples is empty")
        weights.append(weight)
    plan = BatchPlan(weights, g, seed, data.data_blend)
    dataset = MicroBatches(views, plan, spec, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs, seed=seed,
                           pack=data.pack_sequences)
    per_step = mbs * dp_size
    if consumed_samples % per_step:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro batch x dp ({per_step})")
    b, rest = divmod(consumed_samples, g)
    start = b * dataset.num_micro + rest // per_step
    return PretrainLoader(dataset, data.num_workers, data.prefetch_factor, start)


def check_datasets(data_path: list[str]) -> None:
    """Each --data-path prefix has a readable dataset description: a typo is one line naming
    the file before the model is built, not an error after minutes of setup."""
    from megatron_emu.data.blend import parse_data_path
    from megatron_emu.data.indexed import read_meta

    for _, prefix in parse_data_path(data_path) if data_path else []:
        read_meta(_split_view(prefix)[0])


def _split_view(prefix: str) -> tuple[str, str]:
    """`PREFIX:pairs` selects the 5-pair view of an interleaved dataset."""
    if prefix.endswith(":pairs") and not os.path.exists(prefix + ".idx"):
        return prefix[: -len(":pairs")], "pairs"
    return prefix, ""


def ensure_synthetic_corpus(cache_dir: str, tokenizer, seed: int = 0, sizes: dict | None = None,
                            workers: int = 1) -> list[str]:
    """Build (once) and return the synthetic corpus as a data_path list.

    Safe when every rank calls it at once on an empty cache: one builds under a file lock
    while the others wait; each dataset is built under a temporary name and moved into
    place with its .json (the completion marker) last, so no reader sees a partial file.
    """
    from megatron_emu.data.synthetic import DEFAULT_SIZES

    sizes = sizes or DEFAULT_SIZES
    tag = "-".join(f"{k}{v}" for k, v in sizes.items())
    root = os.path.join(cache_dir or default_cache_dir(), f"synthetic-{tokenizer.fingerprint}-s{seed}-{tag}")
    os.makedirs(root, exist_ok=True)
    data_path = []
    for kind, n in sizes.items():
        prefix = os.path.join(root, kind)
        if not _complete(prefix):
            with file_lock(os.path.join(root, ".lock")):
                if not _complete(prefix):  # another rank may have built it while we waited
                    _build_synthetic(root, prefix, kind, n, seed, tokenizer, workers)
        data_path += [str(SYNTHETIC_WEIGHTS[kind]), prefix]
    return data_path


def _build_synthetic(root: str, prefix: str, kind: str, n: int, seed: int, tokenizer, workers: int) -> None:
    from megatron_emu.data.preprocess import preprocess, synthetic_shards

    tmp = tempfile.mkdtemp(dir=root, prefix=f".building-{kind}-")
    try:
        tmp_prefix = os.path.join(tmp, kind)
        preprocess(synthetic_shards(kind, n, seed), tmp_prefix, kind, tokenizer.model_path,
                   num_special=tokenizer.num_special_tokens, workers=workers, progress=False)
        publish(tmp_prefix, prefix, (".bin", ".idx", ".report.json", ".json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(prefix: str) -> bool:
    try:
        meta = read_meta(prefix)
        _check_files(prefix, meta)  # sizes as recorded: not truncated, not mixed
        return "idx_xxh3" in meta  # a cache from before checksums is rebuilt once, with them
    except (ValueError, KeyError):
        return False
