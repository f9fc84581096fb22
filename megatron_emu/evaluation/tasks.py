"""The benchmarks: how each is read, prompted, answered and scored, and its headline metric.

kind: "caption" (generated caption, CIDEr), "vqa" (generated short answer, VQA accuracy),
"video_qa" (generated answer, exact-match accuracy), "wups" (generated answer, WUPS against
WordNet: open-ended NExT-QA, the paper's), "choice" (candidates ranked by likelihood: the
multiple-choice NExT-QA's top-1 accuracy, which the paper does not report), "dialog" (VisDial:
NDCG / MRR of the 100 options).
`template`: Table 8's prompt (data/prompts.py TASK_PROMPTS).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_emu.evaluation.samples import Sample


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    template: str
    metric: str  # the headline metric, as the paper's tables name it
    video: bool = False
    stem: bool = False  # OK-VQA: Porter-stemmed answers (Appendix C.1)
    full_references: bool = False  # VizWiz's evaluation normalises the references too
    unanswerable: bool = False  # VizWiz: "is the answer known?" first (Appendix C.2)
    max_new_tokens: int = 10


TASKS = {
    "coco_caption": TaskSpec("coco_caption", "caption", "caption", "CIDEr", max_new_tokens=30),
    "vqav2": TaskSpec("vqav2", "vqa", "vqa", "VQA acc."),
    "okvqa": TaskSpec("okvqa", "vqa", "vqa", "VQA acc.", stem=True),
    "vizwiz": TaskSpec("vizwiz", "vqa", "vqa", "VQA acc.", full_references=True, unanswerable=True),
    "visdial": TaskSpec("visdial", "dialog", "dialog", "NDCG"),
    "msvd_qa": TaskSpec("msvd_qa", "video_qa", "video_qa", "top-1 acc.", video=True),
    "msrvtt_qa": TaskSpec("msrvtt_qa", "video_qa", "video_qa", "top-1 acc.", video=True),
    "nextqa": TaskSpec("nextqa", "choice", "video_temporal_qa", "top-1 acc.", video=True),  # multiple choice
    "nextqa_oe": TaskSpec("nextqa_oe", "wups", "video_temporal_qa", "WUPS", video=True),  # open-ended: the paper's
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"--task {name}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def read_samples(spec: TaskSpec, files: dict, train: bool = False) -> list[Sample]:
    """The benchmark's samples from its annotation files. files: annotations, questions,
    dense_annotations, image_dir, video_dir, video_map (the train_* ones when `train`)."""
    from megatron_emu.evaluation import coco_files, video_files, visdial_files, vqa_files

    f = {k[len("train_"):]: v for k, v in files.items() if k.startswith("train_")} if train else files
    need = "--train-annotations" if train else "--annotations"
    if not f.get("annotations"):
        raise ValueError(f"--task {spec.name} needs {need}")
    if spec.name == "coco_caption":
        return coco_files.read_karpathy(f["annotations"], f.get("image_dir", ""),
                                        ("train", "restval") if train else ("test",))
    if spec.name in ("vqav2", "okvqa"):
        return vqa_files.read_vqa(f.get("questions", ""), f["annotations"], f.get("image_dir", ""))
    if spec.name == "vizwiz":
        return vqa_files.read_vizwiz(f["annotations"], f.get("image_dir", ""))
    if spec.name == "visdial":
        return visdial_files.read_visdial(f["annotations"], f.get("dense_annotations", ""), f.get("image_dir", ""))
    if spec.name == "nextqa":
        return video_files.read_next_qa(f["annotations"], f.get("video_dir", ""), f.get("video_map", ""))
    if spec.name == "nextqa_oe":
        return video_files.read_next_oe(f["annotations"], f.get("video_dir", ""), f.get("video_map", ""),
                                        f.get("extra_answers", ""))
    return video_files.read_open_video_qa(f["annotations"], f.get("video_dir", ""), spec.name, f.get("video_map", ""))
