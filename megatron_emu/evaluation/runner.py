"""One (task, setting) evaluation: answer the samples not cached yet, in batches over the DP
ranks, gather every answer in the benchmark's order, score, write the JSON.

    result = run_setting(gen, spec, "4", samples, pool, RunOptions(...), dp, identity)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

from tqdm import tqdm

from megatron_emu.evaluation.cache import PredictionCache, fingerprint
from megatron_emu.evaluation.predict import Predictor
from megatron_emu.evaluation.report import write_result
from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.scoring import score_task
from megatron_emu.evaluation.tasks import TaskSpec


@dataclass
class RunOptions:
    output_dir: str
    decoding: object  # generation.DecodingConfig
    batch_size: int = 8
    annotation_files: dict = dataclasses.field(default_factory=dict)  # recorded, and part of the cache key
    use_java: bool | None = None  # caption scorers: None = when java is found
    wordnet_dir: str = ""  # NExT-OE's WUPS: a WordNet dict/ directory ("": nltk's data path)


def cache_for(spec: TaskSpec, setting: str, options: RunOptions, model: str, identity: dict, dp) -> PredictionCache:
    key = fingerprint({"checkpoint": identity, "model": model, "decoding": dataclasses.asdict(options.decoding),
                       "files": options.annotation_files, "contents": file_hashes(options.annotation_files),
                       "task": spec.name, "setting": setting})
    directory = os.path.join(options.output_dir, spec.name, "cache", f"{setting}-{key}")
    return PredictionCache(directory, dp.rank, dp.writes)


def file_hashes(files: dict) -> dict:
    """xxh3 of each annotation file: edited annotations never reuse cached answers."""
    import xxhash

    hashes = {}
    for name, path in files.items():
        if os.path.isfile(path):
            with open(path, "rb") as f:
                hashes[name] = xxhash.xxh3_64(f.read()).hexdigest()
    return hashes


def run_setting(gen, spec: TaskSpec, setting: str, samples: list[Sample], rices, options: RunOptions, dp,
                identity: dict) -> dict:
    cache = cache_for(spec, setting, options, gen.model, identity, dp)
    predictor = Predictor(gen, spec, setting, options.decoding, rices)
    mine = dp.shard(samples)
    todo = [s for s in mine if s.key not in cache]
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{spec.name} k={setting}", unit="sample",
              file=sys.stderr, disable=not dp.first) as bar:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start:start + options.batch_size]
            cache.add(predictor(batch))
            bar.update(len(batch))
    answered = dp.gather({s.key: cache.records[s.key] for s in mine})
    resumed = sum(dp.gather({dp.rank: len(mine) - len(todo)}).values())  # over the DP ranks
    predictions = {s.key: answered[s.key] for s in samples}  # the benchmark's order
    scores = score_task(spec, samples, predictions, options.use_java, options.wordnet_dir)
    result = {
        "task": spec.name, "setting": setting, "metric": spec.metric, "score": scores["score"],
        "metrics": scores["metrics"], "num_samples": len(samples),
        "scorer": {k: scores[k] for k in ("tokenizer", "scorers", "skipped_scorers", "tagger", "wordnet") if k in scores},
        "checkpoint": identity,
        "config": {"model": gen.model, "decoding": dataclasses.asdict(options.decoding), "files": options.annotation_files,
                   "batch_size": options.batch_size, "data_parallel_size": dp.size,
                   "resumed_from_cache": resumed, "torn_cache_lines": cache.torn_lines},
        "samples": [sample_record(s, predictions[s.key], scores["per_sample"][s.key]) for s in samples],
    }
    if dp.first:
        write_result(options.output_dir, spec.name, setting, result)
    dp.barrier()
    return result


def sample_record(sample: Sample, prediction: dict, scores: dict) -> dict:
    record = {"key": sample.key, "visual": sample.visual, **{k: v for k, v in prediction.items() if k != "key"},
              "scores_by_metric": scores}
    if sample.question:
        record["question"] = sample.question
    if sample.references:
        record["references"] = sample.references
    if sample.candidates:
        record["target"] = sample.target
    if sample.question_type:
        record["question_type"] = sample.question_type
    return record
