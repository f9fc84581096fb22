"""VisDial v1.0: the dialogs file and its dense relevance annotations.

visdial_1.0_val.json: {"split": "val2018", "data": {"questions": [...], "answers": [...],
"dialogs": [{"image_id", "caption", "dialog": [{"question": qi, "answer": ai,
"answer_options": [100 answer indices], "gt_index"}] x 10}]}};
visdial_1.0_val_dense_annotations.json: [{"image_id", "round_id" (1-based), "gt_relevance": [100]}].
One sample per densely annotated round (NDCG, the paper's metric, needs them): the 100
options are its candidates, the earlier rounds its history. Images
VisualDialog_<split>_<image_id:012d>.jpg.
"""

from __future__ import annotations

import os

from megatron_emu.evaluation.samples import Sample, existing, field_of, read_json

NUM_OPTIONS = 100


def read_visdial(dialogs_path: str, dense_path: str, image_dir: str) -> list[Sample]:
    root = read_json(dialogs_path, "VisDial dialogs")
    data = field_of(root, "data", dialogs_path, "the file")
    questions, answers = field_of(data, "questions", dialogs_path, "data"), field_of(data, "answers", dialogs_path, "data")
    dialogs = {d["image_id"]: d for d in field_of(data, "dialogs", dialogs_path, "data")}
    split = root.get("split", "val2018")
    samples = []
    for i, dense in enumerate(read_json(dense_path, "VisDial dense annotations")):
        image_id = field_of(dense, "image_id", dense_path, f"record {i}")
        round_id = int(field_of(dense, "round_id", dense_path, f"record {i}"))
        relevance = dense.get("gt_relevance", dense.get("relevance"))
        if image_id not in dialogs:
            raise ValueError(f"{dense_path}: image {image_id} has no dialog in {dialogs_path}")
        rounds = dialogs[image_id]["dialog"]
        if not 1 <= round_id <= len(rounds) or relevance is None or len(relevance) != NUM_OPTIONS:
            raise ValueError(f"{dense_path}: record {i} (image {image_id}) needs round_id in 1..{len(rounds)} "
                             f"and {NUM_OPTIONS} relevance values")
        turn = rounds[round_id - 1]
        options = field_of(turn, "answer_options", dialogs_path, f"image {image_id} round {round_id}")
        if len(options) != NUM_OPTIONS:
            raise ValueError(f"{dialogs_path}: image {image_id} round {round_id} has {len(options)} answer options, "
                             f"not {NUM_OPTIONS}")
        image = os.path.join(image_dir, f"VisualDialog_{split}_{int(image_id):012d}.jpg")
        samples.append(Sample(
            f"{image_id}/{round_id}", existing(image, "image", dialogs_path), question=questions[turn["question"]],
            candidates=[answers[a] for a in options], target=int(turn.get("gt_index", -1)),
            relevance=[float(r) for r in relevance],
            history=[(questions[t["question"]], answers[t["answer"]]) for t in rounds[:round_id - 1]]))
    return samples
