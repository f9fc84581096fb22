"""tools/evaluate.py end to end on a tiny random checkpoint and fixture files of every task:
the JSON and the table with the paper's numbers; 2 data-parallel gloo ranks give the same
answers and scores as one process; a run killed mid-way resumes from its cached answers
(answering only the rest) and gives the same result; bad input is one line."""

import json
import multiprocessing
import os
import signal
import sys

import pytest

from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from tests import eval_fixtures as fx
from tests.dist_utils import spawn

pytest.importorskip("transformers")
pytest.importorskip("pycocoevalcap")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "ckpt"
    import_checkpoint([], get_preset("tiny"), str(root), seed=0)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    return {"coco": fx.karpathy(root, 3, 3), "vqa": fx.vqa_pair(root, "val2014", 3),
            "vqa_train": fx.vqa_pair(root, "train2014", 4, first_id=100), "vizwiz": fx.vizwiz(root, 2),
            "visdial": fx.visdial(root, 1), "msrvtt": fx.msrvtt(root, 2), "msvd": fx.msvd(root, 1),
            "nextqa": fx.nextqa(root, 2), "nextqa_oe": fx.next_oe(root, 4)}


def vqa_argv(checkpoint, data, out, *extra):
    return (["--task", "vqav2", "--checkpoint", checkpoint, "--output-dir", str(out), "--max-new-tokens", "3",
             "--batch-size", "2"] + fx.flags(data["vqa"]) + fx.flags(data["vqa_train"], "train-") + list(extra))


@pytest.fixture(scope="module")
def single_process(checkpoint, data, tmp_path_factory):
    """The reference: VQAv2 zero-shot and 2-shot, one process, never interrupted."""
    out = tmp_path_factory.mktemp("single")
    evaluate.main(vqa_argv(checkpoint, data, out, "--shots", "0", "2"))
    return out


def read(out, task, setting):
    with open(os.path.join(out, task, f"{setting}.json")) as f:
        return json.load(f)


def comparable(result):
    """What must not depend on how the run was split or resumed."""
    return {k: v for k, v in result.items() if k != "config"}


def test_image_tasks_end_to_end_write_json_and_the_table(checkpoint, data, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--task", "coco_caption", "--checkpoint", checkpoint, "--output-dir", str(out), "--no-java",
                   "--max-new-tokens", "4", "--limit", "2"] + fx.flags(data["coco"]))
    table = evaluate.main(vqa_argv(checkpoint, data, out, "--shots", "0", "2", "--text-examples"))
    coco, two_shot = read(out, "coco_caption", "0"), read(out, "vqav2", "2")
    assert coco["metric"] == "CIDEr" and coco["scorer"]["skipped_scorers"]["METEOR"] == "java not used"
    assert [s["key"] for s in coco["samples"]] == ["0", "1"]  # --limit 2 of the 3 test images
    assert all("CIDEr" in s["scores_by_metric"] for s in coco["samples"])
    assert [s["key"] for s in two_shot["samples"]] == ["1", "11", "21"]
    assert all(len(s["examples"]) == 2 and len(s["references"]) == 10 for s in two_shot["samples"])
    assert "caption" in read(out, "vqav2", "0")["samples"][0]  # the chain of thought's caption is kept
    assert two_shot["checkpoint"]["iteration"] == 0 and len(two_shot["checkpoint"]["xxh3"]) == 16
    assert table.splitlines()[0] == ("| task | metric | k=0 ours | k=0 paper | k=0* ours | k=0* paper | k=2 ours | "
                                     "k=2 paper |")
    assert "| coco_caption | CIDEr | " in table and "| 112.40 |" in table
    assert table.count("| vqav2 | VQA acc. |") == 1 and "| 52.00 | " in table and "| 52.90 | " in table
    assert (out / "results.md").read_text() == table


def test_vizwiz_and_visdial_end_to_end(checkpoint, data, tmp_path):
    out = str(tmp_path / "eval")
    common = ["--checkpoint", checkpoint, "--output-dir", out, "--max-new-tokens", "2"]
    evaluate.main(["--task", "vizwiz"] + common + fx.flags(data["vizwiz"]))
    table = evaluate.main(["--task", "visdial"] + common + fx.flags(data["visdial"]))
    vizwiz = read(out, "vizwiz", "0")["samples"]
    assert all("answerable" in s for s in vizwiz)
    assert all(s["prediction"] == "unanswerable" for s in vizwiz if not s["answerable"])
    visdial = read(out, "visdial", "0")
    assert len(visdial["samples"][0]["scores"]) == 100 and set(visdial["metrics"]) == {"NDCG", "MRR"}
    assert "| vizwiz | VQA acc. |" in table and "| visdial | NDCG |" in table and "| 34.20 |" in table


def test_video_tasks_end_to_end(checkpoint, data, tmp_path):
    out = str(tmp_path / "eval")
    common = ["--checkpoint", checkpoint, "--output-dir", out, "--max-new-tokens", "2"]
    evaluate.main(["--task", "msvd_qa"] + common + fx.flags(data["msvd"]))
    evaluate.main(["--task", "msrvtt_qa"] + common + fx.flags(data["msrvtt"]))
    table = evaluate.main(["--task", "nextqa"] + common + fx.flags(data["nextqa"]))
    nextqa = read(out, "nextqa", "0")
    assert nextqa["score"] in (0.0, 50.0, 100.0) and len(nextqa["samples"][0]["scores"]) == 5
    assert read(out, "msrvtt_qa", "0")["samples"][1]["references"] == ["green"]
    for row in ("| msvd_qa | top-1 acc. |", "| msrvtt_qa | top-1 acc. |", "| nextqa | top-1 acc. |"):
        assert row in table
    assert "| nextqa | top-1 acc. | " in table and "nextqa: multiple-choice top-1 accuracy, not in the paper" in table


def test_open_ended_next_qa_scores_wups_end_to_end(checkpoint, data, tmp_path):
    from megatron_emu.evaluation.wordnet import load_wordnet
    from megatron_emu.evaluation.wups import AnswerScorer

    out, files = str(tmp_path / "eval"), data["nextqa_oe"]
    argv = ["--task", "nextqa_oe", "--checkpoint", checkpoint, "--output-dir", out, "--max-new-tokens", "3"]
    table = evaluate.main(argv + fx.flags(files))
    result = read(out, "nextqa_oe", "0")
    assert [s["question_type"] for s in result["samples"]] == ["CW", "TN", "DC", "DO"]
    assert result["samples"][3]["references"] == ["a puppy", "dog"]  # add_reference_answer_val.json's
    scorer = AnswerScorer(load_wordnet(files["wordnet_dir"]))
    per_sample = [scorer.score(s["prediction"], s["references"], s["question_type"]) for s in result["samples"]]
    assert [s["scores_by_metric"] for s in result["samples"]] == per_sample
    assert result["score"] == pytest.approx(100 * sum(p["WUPS"] for p in per_sample) / 4)
    assert result["metrics"]["WUPS_D"] == pytest.approx(100 * (per_sample[2]["WUPS"] + per_sample[3]["WUPS"]) / 2)
    assert set(result["metrics"]) == {"WUPS", "WUPS@0.9", "WUPS_C", "WUPS_T", "WUPS_D"}
    assert result["scorer"]["wordnet"] == os.path.abspath(files["wordnet_dir"]) and "tagger" in result["scorer"]
    assert f"| nextqa_oe | WUPS | {result['score']:.2f} | 19.60 |" in table  # the paper's NExT-QA number
    with pytest.raises(SystemExit, match="--wordnet-dir .*: not a WordNet dict/ directory"):
        evaluate.main(argv + fx.flags({**files, "wordnet_dir": str(tmp_path)}))


def _two_ranks(rank, world_size, argv):
    evaluate.main(argv)


def test_two_data_parallel_ranks_give_the_same_json_as_one(checkpoint, data, single_process, tmp_path, monkeypatch):
    from megatron_emu.evaluation import runner

    two = tmp_path / "two"
    spawn(2, _two_ranks, vqa_argv(checkpoint, data, two, "--shots", "0", "2"))
    for setting in ("0", "2"):
        single, split = read(single_process, "vqav2", setting), read(two, "vqav2", setting)
        assert split["config"]["data_parallel_size"] == 2
        assert comparable(split) == comparable(single)
    assert (single_process / "results.md").read_text() == (two / "results.md").read_text()
    caches = os.listdir(os.path.join(two, "vqav2", "cache"))
    assert all(sorted(os.listdir(os.path.join(two, "vqav2", "cache", c))) == ["rank00000.jsonl", "rank00001.jsonl"]
               for c in caches)
    # one process rerun on the 2-rank output: every answer comes from the two ranks' caches
    answered = []
    real = runner.Predictor.__call__
    monkeypatch.setattr(runner.Predictor, "__call__", lambda self, batch: answered.extend(batch) or real(self, batch))
    evaluate.main(vqa_argv(checkpoint, data, two, "--shots", "0", "2"))
    assert answered == [] and read(two, "vqav2", "2")["config"]["resumed_from_cache"] == 3
    assert comparable(read(two, "vqav2", "2")) == comparable(read(single_process, "vqav2", "2"))


def test_tensor_parallel_ranks_answer_as_one_process(checkpoint, data, single_process, tmp_path):
    """Two ranks holding one TP=2 model (DP=1): the same answers, RICES examples and scores."""
    spawn(2, _two_ranks, vqa_argv(checkpoint, data, tmp_path, "--shots", "0", "2", "--tensor-model-parallel-size", "2"))
    for setting in ("0", "2"):
        sharded = read(tmp_path, "vqav2", setting)
        assert sharded["config"]["data_parallel_size"] == 1
        assert comparable(sharded) == comparable(read(single_process, "vqav2", setting))


def test_pipeline_stages_answer_as_one_process(checkpoint, data, single_process, tmp_path):
    """Two ranks holding one model split into two pipeline stages (PP=2, DP=1): the same answers,
    RICES examples (the first stage's features) and scores; VisDial's candidate likelihoods too."""
    spawn(2, _two_ranks, vqa_argv(checkpoint, data, tmp_path, "--shots", "0", "2", "--pipeline-model-parallel-size", "2"))
    for setting in ("0", "2"):
        staged = read(tmp_path, "vqav2", setting)
        assert staged["config"]["data_parallel_size"] == 1
        assert comparable(staged) == comparable(read(single_process, "vqav2", setting))
    visdial = ["--task", "visdial", "--checkpoint", checkpoint, "--max-new-tokens", "2"] + fx.flags(data["visdial"])
    evaluate.main(visdial + ["--output-dir", str(tmp_path / "one")])
    spawn(2, _two_ranks, visdial + ["--output-dir", str(tmp_path / "pp"), "--pipeline-model-parallel-size", "2"])
    one, staged = read(tmp_path / "one", "visdial", "0"), read(tmp_path / "pp", "visdial", "0")
    assert len(staged["samples"][0]["scores"]) == 100 and comparable(staged) == comparable(one)


def test_data_parallel_ranks_of_pipeline_stages_answer_as_one_process(checkpoint, data, single_process, tmp_path):
    """DP=2 x PP=2 (4 ranks): each pipeline answers half the questions; gathered, as one process."""
    spawn(4, _two_ranks, vqa_argv(checkpoint, data, tmp_path, "--shots", "0", "--pipeline-model-parallel-size", "2"))
    staged = read(tmp_path, "vqav2", "0")
    assert staged["config"]["data_parallel_size"] == 2
    assert comparable(staged) == comparable(read(single_process, "vqav2", "0"))
    cache, = os.listdir(os.path.join(tmp_path, "vqav2", "cache"))
    assert sorted(os.listdir(os.path.join(tmp_path, "vqav2", "cache", cache))) == ["rank00000.jsonl", "rank00001.jsonl"]


def _killed_run(argv):
    import torch

    from tests.eval_faults import kill_after

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it hangs)
    kill_after(1)
    evaluate.main(argv)


def test_killed_evaluation_resumes_from_cached_answers(checkpoint, data, single_process, tmp_path, monkeypatch):
    """Killed (SIGKILL) while caching its second batch: the first batch's answers are on disk,
    the second's line is torn. The rerun answers only the rest and gives the same JSON."""
    from megatron_emu.evaluation import runner

    argv = vqa_argv(checkpoint, data, tmp_path, "--shots", "0")
    killed = multiprocessing.get_context("fork").Process(target=_killed_run, args=(argv,))
    killed.start()
    killed.join()
    assert killed.exitcode == -signal.SIGKILL and not (tmp_path / "vqav2" / "0.json").exists()
    answered = []
    real = runner.Predictor.__call__
    monkeypatch.setattr(runner.Predictor, "__call__", lambda self, batch: answered.extend(s.key for s in batch)
                        or real(self, batch))
    evaluate.main(argv)
    resumed = read(tmp_path, "vqav2", "0")
    assert answered == ["21"]  # questions 1 and 11 (the first batch) came from the cache
    assert resumed["config"]["resumed_from_cache"] == 2 and resumed["config"]["torn_cache_lines"] == 1
    assert comparable(resumed) == comparable(read(single_process, "vqav2", "0"))
    answered.clear()
    evaluate.main(argv)  # everything cached now: nothing is answered again
    assert answered == []


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqav2"], "--task and --checkpoint are required"),
    (["--task", "vqav2", "--checkpoint", "CKPT"], "needs --annotations"),
    (["--task", "vqav2", "--checkpoint", "CKPT", "QUESTIONS", "--shots", "2"], "needs --train-annotations"),
    (["--task", "vqav2", "--checkpoint", "/nonexistent", "QUESTIONS"], "/nonexistent: no such checkpoint"),
    (["--task", "vqav2", "--checkpoint", "CKPT", "QUESTIONS", "TRAIN", "--shots", "8"],
     "setting 8 needs 8 in-context examples; the training files hold 4 samples"),
])
def test_bad_input_is_one_line(checkpoint, data, argv, message, tmp_path, capsys):
    expanded = []
    for a in argv:
        if a in ("QUESTIONS", "TRAIN"):
            expanded += fx.flags(data["vqa"]) if a == "QUESTIONS" else fx.flags(data["vqa_train"], "train-")
        else:
            expanded.append(checkpoint if a == "CKPT" else a)
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(expanded + ["--output-dir", str(tmp_path)])
    assert message in str(exit_.value.code) + capsys.readouterr().err  # usage errors: on stderr, exit 2


def test_tool_run_bare_prints_usage_and_an_example_not_a_traceback():
    import subprocess

    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2 and "Traceback" not in done.stderr  # usage errors exit 2, as argparse's
    assert sum("error:" in line for line in done.stderr.splitlines()) == 1
    assert "usage: evaluate.py" in done.stderr and "example: python tools/evaluate.py --task" in done.stderr
