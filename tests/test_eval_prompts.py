"""Evaluation prompts and answering: RICES returns the nearest training examples by feature
similarity (and caches the pool's features); each setting's prompt has the paper's layout
(zero-shot with the chain of thought, two text-only examples, k shots joined by ". ");
candidate likelihoods equal a full forward pass of prompt + candidate."""

import os
from pathlib import Path

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.evaluation import prompting
from megatron_emu.evaluation.distributed import DataParallel
from megatron_emu.evaluation.rices import Rices, draw_pool
from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.tasks import TASKS
from megatron_emu.generation.prompts import Video
from megatron_emu.model.emu import build_emu
from tests import eval_fixtures as fx

CONFIG = get_preset("tiny")


def unit(*values):
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float), dim=0)


def test_rices_returns_the_most_similar_examples_first():
    pool = [Sample(str(i), f"{i}.png", references=[f"a{i}"]) for i in range(4)]
    features = torch.stack([unit(1, 0), unit(0, 1), unit(1, 1), unit(-1, 0)])  # (4, 2)
    rices = Rices(pool, features)
    assert [s.key for s in rices.nearest(unit(1, 0.2), 2)] == ["0", "2"]
    assert [s.key for s in rices.nearest(unit(-1, 0.1), 3)] == ["3", "1", "2"]
    assert [s.key for s in rices.nearest(unit(1, 0.2), 2, exclude="0")] == ["2", "1"]


def test_rices_pool_is_a_seeded_draw_of_5000():
    train = [Sample(str(i), "") for i in range(6000)]
    pool = draw_pool(train, seed=3)
    assert len(pool) == 5000 and pool == draw_pool(train, seed=3) and pool != draw_pool(train, seed=4)
    assert draw_pool(train[:10]) == train[:10]


def test_rices_features_are_computed_once_and_cached(tmp_path, monkeypatch):
    from megatron_emu.evaluation import rices as rices_module

    files = fx.vqa_pair(str(tmp_path), "train2014", 3)
    pool = [Sample(str(i), os.path.join(files["image_dir"], f"COCO_train2014_{i:012d}.jpg")) for i in range(3)]
    emu = build_emu(CONFIG, seed=0).eval()
    calls = []
    real = rices_module.visual_features
    monkeypatch.setattr(rices_module, "visual_features", lambda *a: calls.append(1) or real(*a))
    first = Rices.build(emu, TASKS["vqav2"], pool, str(tmp_path / "cache"), "ckpt-a", DataParallel())
    assert len(calls) == 3 and torch.allclose(first.features.norm(dim=1), torch.ones(3))
    again = Rices.build(emu, TASKS["vqav2"], pool, str(tmp_path / "cache"), "ckpt-a", DataParallel())
    assert len(calls) == 3 and torch.equal(again.features, first.features)  # read back, not recomputed
    Rices.build(emu, TASKS["vqav2"], pool, str(tmp_path / "cache"), "ckpt-b", DataParallel())
    assert len(calls) == 6  # another checkpoint: other features
    # an image's own feature is its nearest neighbour
    assert first.nearest(first.features[1], 1)[0].key == "1"


QUERY = Sample("q", "query.png", question="what colour is the car?", references=["red"] * 10)
EXAMPLES = [Sample(f"e{i}", f"e{i}.png", question=f"what is {i}?", references=[f"answer{i}"]) for i in range(4)]


def test_zero_shot_emu_prompt_has_the_chain_of_thought_caption():
    spec = TASKS["vqav2"]
    assert prompting.uses_chain_of_thought(spec, "emu", "0") and not prompting.uses_chain_of_thought(spec, "emu-i", "0")
    items = prompting.build_prompt(spec, "emu", "0", QUERY, [], caption="a red car on a road.")
    assert items == [Path("query.png"),
                     "a picture of a red car on a road. based on the picture, what colour is the car? short answer:"]


def test_two_text_examples_have_no_images():
    items = prompting.build_prompt(TASKS["vqav2"], "emu", "0*", QUERY, EXAMPLES[:2], caption="a car")
    assert items[:2] == ["based on the picture, what is 0? short answer: answer0. ",
                         "based on the picture, what is 1? short answer: answer1. "]
    assert items[2] == Path("query.png") and items[3].startswith("a picture of a car. based on the picture")
    assert sum(isinstance(i, Path) for i in items) == 1


@pytest.mark.parametrize("k", [2, 4])
def test_k_shot_prompt_holds_k_examples_in_the_paper_layout(k):
    items = prompting.build_prompt(TASKS["vqav2"], "emu", str(k), QUERY, EXAMPLES[:k])
    assert len(items) == 2 * k + 2
    for i in range(k):  # (image, its text with the answer, ". "-joined), then the query
        assert items[2 * i] == Path(f"e{i}.png")
        assert items[2 * i + 1] == f"based on the picture, what is {i}? short answer: answer{i}. "
    assert items[-2:] == [Path("query.png"), "based on the picture, what colour is the car? short answer:"]


def test_few_shot_example_videos_keep_two_frames(tmp_path):
    files = fx.msrvtt(str(tmp_path), 2)
    video_dir = files["video_dir"]
    query = Sample("0", os.path.join(video_dir, "video7000"), question="what?")
    example = Sample("1", os.path.join(video_dir, "video7001"), question="who?", references=["man"])
    items = prompting.build_prompt(TASKS["msrvtt_qa"], "emu", "2", query, [example, example])
    videos = [i for i in items if isinstance(i, Video)]
    assert [len(v.frames) for v in videos] == [2, 2, 8]
    assert items[1] == "a question about the video: who? answer: man. "


def test_visdial_history_uses_table_8_turns():
    sample = Sample("1/3", "x.png", question="is it sunny", candidates=["yes", "no"], target=0,
                    history=[("is there a dog", "yes"), ("what colour", "brown")])
    text = prompting.query_text(TASKS["visdial"], "emu", sample, caption="a dog")
    assert text == ("a picture of a dog. based on the picture, is there a dog? short answer: yes based on the picture, "
                    "what colour? short answer: brown based on the picture, is it sunny? short answer:")


@pytest.mark.parametrize("generated, answer", [
    ("it is red. and more", "red"), ("it's 2.5 meters\nnext", "2.5 meters"), (" two dogs ", "two dogs")])
def test_clean_answer_keeps_the_first_sentence_without_filler(generated, answer):
    assert prompting.clean_answer(generated) == answer


def test_bad_setting_is_one_line():
    with pytest.raises(ValueError, match="use 0, 0\\* .* or a number of shots"):
        prompting.parse_setting("4*")


def test_candidate_likelihood_equals_a_full_forward_pass():
    from megatron_emu.evaluation.likelihood import continuation_logprobs
    from megatron_emu.generation.forward import CachedForward
    from megatron_emu.generation.prompts import build_prompt

    emu = build_emu(CONFIG, seed=0).eval()
    tokenizer = EmuTokenizer(build_tiny_tokenizer())
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    prompt = build_prompt([image, "based on the picture, is it red? short answer:"], tokenizer, CONFIG)
    candidates = [tokenizer.encode(t) for t in ("yes", "a red circle on a table", "no")]
    got = continuation_logprobs(CachedForward(emu), prompt, candidates, chunk=2)
    for candidate, value in zip(candidates, got):
        tokens = torch.tensor([prompt.tokens + candidate])
        with torch.no_grad():
            logits = emu(tokens, prompt.images).logits[0, :, :CONFIG.llm.vocab_size].float()  # (S, V)
        never = list(CONFIG.special_tokens.ignored_in_ce)
        logits[:, never] = float("-inf")  # as the generator: never-generated tokens are impossible
        logp = logits.log_softmax(-1)[len(prompt.tokens) - 1:-1].gather(1, torch.tensor(candidate)[:, None])
        assert value == pytest.approx(logp.mean().item(), abs=1e-4)
