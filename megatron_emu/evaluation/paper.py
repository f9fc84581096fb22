"""The paper's numbers (Tables 1-3), to print beside ours.

Settings: "0" zero-shot (Table 1, with the multimodal chain of thought for Emu's QA),
"0*" zero-shot with two text-only examples (Table 1's asterisk), "2" / "4" / "8" shots
with RICES (Table 3, Emu only). Percent, except CIDEr (x100, as the paper) and FID. NExT-QA's
numbers are WUPS on the open-ended answers (Table 7): our task nextqa_oe.
"""

from __future__ import annotations

PAPER = {
    "emu": {
        "coco_caption": {"0": 112.4},
        "vqav2": {"0": 52.0, "0*": 52.9, "2": 56.4, "4": 58.4, "8": 59.0},
        "okvqa": {"0": 38.2, "0*": 42.8},
        "vizwiz": {"0": 34.2, "0*": 34.4, "2": 37.8, "4": 41.3, "8": 43.9},
        "visdial": {"0": 47.4, "0*": 47.8},
        "msvd_qa": {"0": 18.8, "0*": 34.3, "2": 36.0, "4": 37.1, "8": 39.8},
        "msrvtt_qa": {"0": 8.3, "0*": 17.8, "2": 21.2, "4": 21.8, "8": 24.1},
        "nextqa_oe": {"0": 19.6, "0*": 23.4},
        "coco_fid": {"0": 11.66},
    },
    "emu-i": {
        "coco_caption": {"0": 117.7},
        "vqav2": {"0": 40.0, "0*": 57.5},
        "okvqa": {"0": 34.7, "0*": 46.2},
        "vizwiz": {"0": 35.4, "0*": 38.1},
        "visdial": {"0": 48.0, "0*": 50.1},
        "msvd_qa": {"0": 32.4, "0*": 36.4},
        "msrvtt_qa": {"0": 14.0, "0*": 21.1},
        "nextqa_oe": {"0": 6.8, "0*": 19.7},
    },
}

# Where our number is not measured as the paper's was.
PAPER_NOTES = {
    "nextqa": "multiple-choice top-1 accuracy, not in the paper (it reports WUPS on the open-ended answers: nextqa_oe)",
}


def paper_number(model: str, task: str, setting: str) -> float | None:
    return PAPER.get(model, {}).get(task, {}).get(setting)
