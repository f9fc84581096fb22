"""Tiny benchmark files in each benchmark's own format, with random images and frame-directory
videos, for the evaluation tests (nothing here is real data)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from PIL import Image

WORDS = "red blue green circle square cat dog table sofa tree car house".split()


def image(path: str, seed: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def video(directory: str, seed: int, frames: int = 8) -> str:
    for f in range(frames):
        image(os.path.join(directory, f"{f:03d}.png"), seed * 100 + f)
    return directory


def sentence(rng, n=5) -> str:
    return " ".join(rng.choice(WORDS, n))


def write_json(path: str, data) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def karpathy(root: str, n_test: int = 4, n_train: int = 3) -> dict:
    rng = np.random.default_rng(1)
    images = []
    for i in range(n_test + n_train):
        split, folder = ("test", "val2014") if i < n_test else ("train", "train2014")
        name = f"COCO_{folder}_{i:012d}.jpg"
        image(os.path.join(root, "coco", folder, name), i)
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": i, "imgid": i,
                       "sentences": [{"raw": sentence(rng).capitalize() + ".", "tokens": []} for _ in range(5)]})
    return {"annotations": write_json(os.path.join(root, "dataset_coco.json"), {"images": images}),
            "image_dir": os.path.join(root, "coco")}


def vqa_pair(root: str, subtype: str, n: int, answers_per_question: list[list[str]] | None = None,
             first_id: int = 0) -> dict:
    rng = np.random.default_rng(2 + first_id)
    questions, annotations = [], []
    for i in range(n):
        image_id, qid = first_id + i, (first_id + i) * 10 + 1
        image(os.path.join(root, subtype, f"COCO_{subtype}_{image_id:012d}.jpg"), 50 + image_id)
        answers = answers_per_question[i] if answers_per_question else list(rng.choice(WORDS[:4], 10))
        questions.append({"image_id": image_id, "question": f"what is the {WORDS[i % 12]}?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": image_id, "answer_type": "other",
                            "multiple_choice_answer": answers[0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(answers)]})
    return {"questions": write_json(os.path.join(root, f"questions_{subtype}.json"),
                                    {"data_subtype": subtype, "questions": questions}),
            "annotations": write_json(os.path.join(root, f"annotations_{subtype}.json"), {"annotations": annotations}),
            "image_dir": os.path.join(root, subtype)}


def vizwiz(root: str, n: int = 3) -> dict:
    records = []
    for i in range(n):
        name = f"VizWiz_val_{i:08d}.jpg"
        image(os.path.join(root, "vizwiz", name), 70 + i)
        answers = ["unanswerable"] * 10 if i == 0 else ["red"] * 6 + ["blue"] * 4
        records.append({"image": name, "question": "what colour is this?", "answerable": int(i != 0),
                        "answer_type": "other", "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
    return {"annotations": write_json(os.path.join(root, "vizwiz_val.json"), records),
            "image_dir": os.path.join(root, "vizwiz")}


def visdial(root: str, n: int = 2, options: int = 100) -> dict:
    rng = np.random.default_rng(3)
    questions = [f"is there a {w}" for w in WORDS]
    answers = [sentence(rng, 1 + i % 3) for i in range(options + 5)]
    dialogs, dense = [], []
    for i in range(n):
        image(os.path.join(root, "visdial", f"VisualDialog_val2018_{i:012d}.jpg"), 90 + i)
        rounds = [{"question": (i + r) % len(questions), "answer": r, "gt_index": r % options,
                   "answer_options": list(range(r, r + options))} for r in range(3)]
        dialogs.append({"image_id": i, "caption": "a picture", "dialog": rounds})
        dense.append({"image_id": i, "round_id": 2 + i % 2,
                      "gt_relevance": [float(x) for x in rng.choice([0.0, 0.0, 0.5, 1.0], options)]})
    return {"annotations": write_json(os.path.join(root, "visdial_1.0_val.json"),
                                      {"version": "1.0", "split": "val2018",
                                       "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}),
            "dense_annotations": write_json(os.path.join(root, "visdial_dense.json"), dense),
            "image_dir": os.path.join(root, "visdial")}


def msrvtt(root: str, n: int = 3, name: str = "test_qa.json", first: int = 0) -> dict:
    records = []
    for i in range(first, first + n):
        video(os.path.join(root, "msrvtt", f"video{7000 + i}"), 110 + i)
        records.append({"id": i, "video_id": 7000 + i, "question": f"what is the {WORDS[i]} doing?", "answer": WORDS[i + 1]})
    return {"annotations": write_json(os.path.join(root, name), records), "video_dir": os.path.join(root, "msrvtt")}


def msvd(root: str, n: int = 2) -> dict:
    records, lines = [], []
    for i in range(1, n + 1):
        video(os.path.join(root, "msvd", f"yt{i}_1_5"), 130 + i)
        lines.append(f"yt{i}_1_5 vid{i}\n")
        records.append({"id": i, "video_id": i, "question": "who is running?", "answer": "man"})
    mapping = os.path.join(root, "youtube_mapping.txt")
    with open(mapping, "w") as f:
        f.writelines(lines)
    return {"annotations": write_json(os.path.join(root, "msvd_test_qa.json"), records),
            "video_dir": os.path.join(root, "msvd"), "video_map": mapping}


def nextqa(root: str, n: int = 2) -> dict:
    path = os.path.join(root, "nextqa_val.csv")
    mapping = {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                         "a0", "a1", "a2", "a3", "a4"])
        for i in range(n):
            vid = str(4000 + i)
            mapping[vid] = f"0000/{vid}"
            video(os.path.join(root, "nextqa", "0000", vid), 150 + i)
            writer.writerow([vid, 90, 32, 32, "why did the dog run", i % 5, i, "CW",
                             "to eat", "to play", "it was cold", "to sleep", "a red ball"])
    return {"annotations": path, "video_dir": os.path.join(root, "nextqa"),
            "video_map": write_json(os.path.join(root, "map_vid_vidorID.json"), mapping)}


def next_oe(root: str, n: int = 4) -> dict:
    """NExT-OE's val.csv (open-ended answers, question types), add_reference_answer_val.json, the
    NExT-QA video map, and a tiny WordNet (tests/wordnet_fixture.py) whose words the answers use."""
    from tests.wordnet_fixture import write_wordnet

    path = os.path.join(root, "nextoe_val.csv")
    answers = [("what did the dog chase", "the ball", "CW"), ("what is the cat doing", "playing with a toy", "TN"),
               ("how many dogs are there", "two", "DC"), ("what animal is on the sofa", "a puppy", "DO")]
    mapping, extra = {}, {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type"])
        for i in range(n):
            vid = str(5000 + i)
            mapping[vid] = f"0001/{vid}"
            video(os.path.join(root, "nextoe", "0001", vid), 170 + i)
            question, answer, qtype = answers[i % len(answers)]
            writer.writerow([vid, 90, 32, 32, question, answer, i, qtype])
            if qtype == "DO":
                extra[vid] = {str(i): "dog"}
    return {"annotations": path, "video_dir": os.path.join(root, "nextoe"),
            "video_map": write_json(os.path.join(root, "nextoe_map_vid_vidorID.json"), mapping),
            "extra_answers": write_json(os.path.join(root, "add_reference_answer_val.json"), extra),
            "wordnet_dir": write_wordnet(os.path.join(root, "wordnet"))}


def flags(files: dict, prefix: str = "") -> list[str]:
    out = []
    for name, value in files.items():
        out += [f"--{prefix}{name.replace('_', '-')}", value]
    return out


def write_all(root: str) -> dict:
    """Every benchmark's fixture under `root` (the README's evaluation example)."""
    os.makedirs(root, exist_ok=True)
    vqa = vqa_pair(root, "val2014", 4)  # OK-VQA's files have VQAv2's format: the same fixture serves both
    return {"coco": karpathy(root), "vqa": vqa, "vqa_train": vqa_pair(root, "train2014", 6, first_id=100),
            "okvqa": vqa, "vizwiz": vizwiz(root, 4), "visdial": visdial(root, 2),
            "msvd": msvd(root, 2), "msrvtt": msrvtt(root, 3), "msrvtt_train": msrvtt(root, 3, "train_qa.json", first=3),
            "nextqa": nextqa(root, 3), "nextqa_oe": next_oe(root, 4)}


if __name__ == "__main__":  # python -m tests.eval_fixtures DIR: write them all, print where
    import sys

    for name, files in write_all(sys.argv[1] if len(sys.argv) > 1 else "eval_fixtures").items():
        print(name, " ".join(flags(files)))
