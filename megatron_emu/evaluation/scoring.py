"""Scores of a task's gathered predictions: one per sample, and the headline on the paper's
scale (percent; CIDEr x 100, as Table 1 prints 112.4 for pycocoevalcap's 1.124). Open-ended
NExT-QA's WUPS needs WordNet from a local directory (`wordnet_dir`, wordnet.py).
"""

from __future__ import annotations

import os

from megatron_emu.evaluation.ranking import ndcg, reciprocal_rank, top1_correct
from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.tasks import TaskSpec
from megatron_emu.evaluation.vqa_accuracy import normalise_answer, vqa_accuracy


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def score_task(spec: TaskSpec, samples: list[Sample], predictions: dict[str, dict], use_java: bool | None = None,
               wordnet_dir: str = "") -> dict:
    """-> {"score": headline, "metrics": {name: corpus value}, "per_sample": {key: {metric: value}}, ...}."""
    if spec.kind == "caption":
        return _captions(samples, predictions, use_java)
    extra = {}
    if spec.kind == "wups":
        from megatron_emu.evaluation.wordnet import load_wordnet
        from megatron_emu.evaluation.wups import AnswerScorer, load_tagger

        wups = AnswerScorer(load_wordnet(wordnet_dir), load_tagger())
        extra = {"tagger": wups.tagger_name, "wordnet": os.path.abspath(wordnet_dir) if wordnet_dir else "nltk data path"}
    per_sample = {}
    for s in samples:
        p = predictions[s.key]
        if spec.kind == "vqa":
            per_sample[s.key] = {"VQA acc.": vqa_accuracy(p["prediction"], s.references, spec.full_references, spec.stem)}
        elif spec.kind == "video_qa":
            per_sample[s.key] = {"top-1 acc.": float(normalise_answer(p["prediction"]) == normalise_answer(s.references[0]))}
        elif spec.kind == "wups":
            per_sample[s.key] = wups.score(p["prediction"], s.references, s.question_type)
        elif spec.kind == "choice":
            per_sample[s.key] = {"top-1 acc.": top1_correct(p["scores"], s.target)}
        else:  # dialog
            per_sample[s.key] = {"NDCG": ndcg(p["scores"], s.relevance)}
            if s.target >= 0:
                per_sample[s.key]["MRR"] = reciprocal_rank(p["scores"], s.target)
    names = sorted({name for scores in per_sample.values() for name in scores})
    scale = {"MRR": 1}  # VisDial reports MRR in [0, 1], the rest in percent
    metrics = {name: scale.get(name, 100) * mean(v[name] for v in per_sample.values() if name in v) for name in names}
    return {"score": metrics[spec.metric], "metrics": metrics, "per_sample": per_sample, **extra}


def _captions(samples: list[Sample], predictions: dict[str, dict], use_java: bool | None) -> dict:
    from megatron_emu.evaluation.caption_scores import caption_scores

    result = caption_scores({s.key: predictions[s.key]["prediction"] for s in samples},
                            {s.key: s.references for s in samples}, use_java)
    metrics = {name: 100 * value for name, value in result["corpus"].items()}
    return {"score": metrics["CIDEr"], "metrics": metrics, "per_sample": result["per_sample"],
            "tokenizer": result["tokenizer"], "scorers": result["scorers"], "skipped_scorers": result["skipped"]}
