"""The benchmark readers on fixtures in each benchmark's own format, and one-line errors
naming the file for what is missing or malformed."""

import json
import os

import pytest

from megatron_emu.evaluation.tasks import TASKS, read_samples
from tests import eval_fixtures as fx


def test_karpathy_test_split_and_train_pool(tmp_path):
    files = fx.karpathy(str(tmp_path), n_test=4, n_train=3)
    test = read_samples(TASKS["coco_caption"], files)
    train = read_samples(TASKS["coco_caption"], {f"train_{k}": v for k, v in files.items()} | files, train=True)
    assert [s.key for s in test] == ["0", "1", "2", "3"] and [s.key for s in train] == ["4", "5", "6"]
    assert len(test[0].references) == 5 and test[0].visual.endswith("val2014/COCO_val2014_000000000000.jpg")


def test_vqa_questions_joined_with_their_ten_answers(tmp_path):
    files = fx.vqa_pair(str(tmp_path), "val2014", 3)
    samples = read_samples(TASKS["vqav2"], files)
    assert [s.key for s in samples] == ["1", "11", "21"] and all(len(s.references) == 10 for s in samples)
    assert samples[1].question == "what is the blue?" and os.path.exists(samples[1].visual)


def test_vizwiz_visdial_and_video_files(tmp_path):
    root = str(tmp_path)
    vizwiz = read_samples(TASKS["vizwiz"], fx.vizwiz(root))
    assert vizwiz[0].references == ["unanswerable"] * 10 and vizwiz[1].answer == "red"
    visdial = read_samples(TASKS["visdial"], fx.visdial(root))
    assert [s.key for s in visdial] == ["0/2", "1/3"] and len(visdial[1].history) == 2
    assert len(visdial[0].candidates) == 100 and len(visdial[0].relevance) == 100 and visdial[0].target == 1
    msrvtt = read_samples(TASKS["msrvtt_qa"], fx.msrvtt(root, 2))
    assert msrvtt[0].visual.endswith("video7000") and msrvtt[0].references == ["blue"]
    msvd = read_samples(TASKS["msvd_qa"], fx.msvd(root))
    assert msvd[1].visual.endswith("yt2_1_5")
    nextqa = read_samples(TASKS["nextqa"], fx.nextqa(root, 2))
    assert nextqa[1].key == "4001_1" and nextqa[1].answer == "to play" and nextqa[1].visual.endswith("0000/4001")


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    root = str(tmp_path)
    files = fx.vqa_pair(root, "val2014", 2)
    with pytest.raises(ValueError, match="needs --annotations"):
        read_samples(TASKS["vqav2"], {})
    with pytest.raises(ValueError, match="nope.json: no such VQA questions file"):
        read_samples(TASKS["vqav2"], {**files, "questions": os.path.join(root, "nope.json")})
    broken = os.path.join(root, "broken.json")
    with open(broken, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        read_samples(TASKS["vizwiz"], {"annotations": broken})
    os.remove(os.path.join(files["image_dir"], "COCO_val2014_000000000001.jpg"))
    with pytest.raises(ValueError, match="COCO_val2014_000000000001.jpg: image named by .*questions_val2014.json"):
        read_samples(TASKS["vqav2"], files)
    with open(files["annotations"]) as f:
        annotations = json.load(f)
    del annotations["annotations"][0]["answers"]
    fx.write_json(files["annotations"], annotations)
    with pytest.raises(ValueError, match="annotations_val2014.json: question 1 has no 'answers' field"):
        read_samples(TASKS["vqav2"], files)
    video = fx.msrvtt(root, 1)
    with pytest.raises(ValueError, match="video7000: video named by .*test_qa.json not found"):
        read_samples(TASKS["msrvtt_qa"], {**video, "video_dir": root})
    with pytest.raises(ValueError, match="msvd_qa: give --video-map"):
        read_samples(TASKS["msvd_qa"], {**fx.msvd(root), "video_map": ""})
