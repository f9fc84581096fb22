"""Image question answering files: VQAv2 and OK-VQA (the VQA API's questions + annotations
pair) and VizWiz (one list with the answers inline).

VQAv2 / OK-VQA questions: {"data_subtype": "val2014", "questions": [{"image_id", "question",
"question_id"}]}; annotations: {"annotations": [{"question_id", "answers": [{"answer"}] x 10,
"multiple_choice_answer"}]}; images COCO_<subtype>_<image_id:012d>.jpg.
VizWiz: [{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer"}] x 10}].
"""

from __future__ import annotations

import os

from megatron_emu.evaluation.samples import Sample, existing, field_of, read_json


def read_vqa(questions_path: str, annotations_path: str, image_dir: str) -> list[Sample]:
    questions = read_json(questions_path, "VQA questions")
    annotations = read_json(annotations_path, "VQA annotations")
    subtype = questions.get("data_subtype", "val2014") if isinstance(questions, dict) else ""
    answers = {}
    for a in field_of(annotations, "annotations", annotations_path, "the file"):
        qid = field_of(a, "question_id", annotations_path, "an annotation")
        answers[qid] = [field_of(x, "answer", annotations_path, f"question {qid}'s answers")
                        for x in field_of(a, "answers", annotations_path, f"question {qid}")]
    samples = []
    for q in field_of(questions, "questions", questions_path, "the file"):
        qid = field_of(q, "question_id", questions_path, "a question")
        if qid not in answers:
            raise ValueError(f"{annotations_path}: no answers for question {qid} of {questions_path}")
        image = os.path.join(image_dir, f"COCO_{subtype}_{int(field_of(q, 'image_id', questions_path, f'question {qid}')):012d}.jpg")
        samples.append(Sample(str(qid), existing(image, "image", questions_path),
                              question=field_of(q, "question", questions_path, f"question {qid}"),
                              references=answers[qid]))
    return samples


def read_vizwiz(path: str, image_dir: str) -> list[Sample]:
    records = read_json(path, "VizWiz annotations")
    if not isinstance(records, list):
        raise ValueError(f"{path}: VizWiz annotations are a list of questions")
    samples = []
    for i, r in enumerate(records):
        image = field_of(r, "image", path, f"record {i}")
        answers = [field_of(a, "answer", path, f"{image}'s answers") for a in field_of(r, "answers", path, image)]
        samples.append(Sample(image, existing(os.path.join(image_dir, image), "image", path),
                              question=field_of(r, "question", path, image), references=answers))
    return samples
