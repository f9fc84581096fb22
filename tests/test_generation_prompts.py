"""Generation prompts: image and video blocks laid out as in training, the paper's task
prompts (Table 8), in-context examples, Emu-I's chat template with the 6-token vocabulary,
and bad inputs refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_emu.config import get_preset
from megatron_emu.data.prompts import system_message_parts
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.generation.prompts import (
    Tokens,
    Video,
    build_prompt,
    chat_prompt,
    few_shot_prompt,
    task_prompt,
    task_text,
)

CONFIG = get_preset("tiny")
SPECIAL = CONFIG.special_tokens
BLOCK = [SPECIAL.img_start] + [SPECIAL.image] * 32 + [SPECIAL.img_end]


@pytest.fixture(scope="module")
def tokenizer():
    return EmuTokenizer(build_tiny_tokenizer())


@pytest.fixture(scope="module")
def instruct_tokenizer():
    return EmuTokenizer(build_tiny_tokenizer(), num_special_tokens=6)


def picture(seed=0, shape=(60, 80, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_images_become_blocks_in_order_of_any_kind(tokenizer, tmp_path):
    path = tmp_path / "b.png"
    Image.fromarray(picture(1)).save(path)
    prompt = build_prompt([picture(0), "and", Path(path), Image.fromarray(picture(2)), "end"], tokenizer, CONFIG)
    words = tokenizer.encode("and")
    assert prompt.tokens == [tokenizer.bos_id] + BLOCK + words + BLOCK + BLOCK + tokenizer.encode("end")
    assert prompt.images.shape == (3, 3, 224, 224) and prompt.images.dtype == torch.uint8
    # The path and the array of the same pixels give the same image.
    again = build_prompt([picture(1)], tokenizer, CONFIG)
    assert torch.equal(again.images[0], prompt.images[1])
    chw = build_prompt([torch.from_numpy(picture(1).transpose(2, 0, 1).copy())], tokenizer, CONFIG)
    assert torch.equal(chw.images[0], prompt.images[1])


def test_a_video_is_its_frames_in_order(tokenizer):
    video = Video([picture(i) for i in range(8)])
    prompt = build_prompt([video, "a video of"], tokenizer, CONFIG)
    assert prompt.tokens == [tokenizer.bos_id] + BLOCK * 8 + tokenizer.encode("a video of")
    assert torch.equal(prompt.images[5], build_prompt([picture(5)], tokenizer, CONFIG).images[0])
    assert len(Video([picture(i) for i in range(16)]).subsample(8).frames) == 8


def test_video_from_a_directory_of_frames(tmp_path):
    for i in range(12):
        Image.fromarray(picture(i)).save(tmp_path / f"{i:02d}.png")
    assert len(Video.from_path(str(tmp_path)).frames) == 8
    with pytest.raises(ValueError, match="unusable video"):
        Video.from_path(str(tmp_path / "missing.mp4"))


def test_task_prompts_are_table_8_with_the_visual_first():
    assert task_text("caption") == "describing the image in detail. the image shows"
    assert task_text("vqa", caption="a cat", question="what colour?") == \
        "a picture of a cat. based on the picture, what colour? short answer:"
    assert task_text("vqa", "emu-i", question="what colour?").endswith("one word or phrase. what colour? [ASSISTANT]: the answer is:")
    items = task_prompt("IMG", "video_qa", caption="a ball", question="what moves?")
    assert items == ["IMG", "a video of a ball. a question about the video: what moves? answer:"]
    with pytest.raises(ValueError, match=r"needs \{caption\}"):
        task_text("vqa", question="q")
    with pytest.raises(ValueError, match="task 'poem'"):
        task_text("poem")


def test_few_shot_puts_k_examples_before_the_query_with_two_frame_videos(tokenizer):
    video = lambda s: Video([picture(s + i) for i in range(8)])  # noqa: E731
    items = few_shot_prompt([(video(0), "a video of a red ball. answer: red"), (video(10), "... answer: blue.")],
                            (video(20), "a video of a cube. answer:"))
    assert [len(i.frames) for i in items if isinstance(i, Video)] == [2, 2, 8]
    assert items[1] == "a video of a red ball. answer: red. " and items[3] == "... answer: blue. "
    prompt = build_prompt(items, tokenizer, CONFIG)
    assert prompt.images.shape[0] == 12 and prompt.tokens.count(SPECIAL.img_start) == 12


def test_chat_template_uses_the_added_tokens_and_the_image_system_message(instruct_tokenizer):
    image = picture(3)
    tok = instruct_tokenizer
    items = chat_prompt(tok, [("what is it?", "a square")], "which colour?", visual=image)
    before, after = system_message_parts("image")
    assert items[0] == Tokens(tok.encode(before.strip())) and items[1] is image
    assert items[2] == Tokens(tok.encode(after.strip()))
    ids = build_prompt(items, tok, CONFIG).tokens
    user, assistant, eos = SPECIAL.user, SPECIAL.assistant, tok.eos_id
    tail = [user] + tok.encode(": what is it?") + [assistant] + tok.encode(":") + tok.encode("a square") + \
        [eos, user] + tok.encode(": which colour?") + [assistant] + tok.encode(":")
    assert ids[-len(tail):] == tail
    assert ids.count(SPECIAL.img_start) == 1
    assert chat_prompt(tok, [], "hi")[0] == Tokens([user] + tok.encode(": hi") + [assistant] + tok.encode(":"))  # no system message
    video = chat_prompt(tok, [], "hi", visual=Video([image] * 8))
    assert video[0] == Tokens(tok.encode(system_message_parts("video")[0].strip())) and video[1:9] == [image] * 8


def test_user_marker_needs_the_instruct_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"\[USER\] needs Emu-I's vocabulary"):
        build_prompt(["[USER]: hi"], tokenizer, CONFIG)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8), dtype=np.uint8), "uint8 \\(H, W, 3\\)"),
    (np.zeros((40, 40, 3), dtype=np.float32), "uint8 \\(H, W, 3\\)"),
    (np.zeros((10, 10, 3), dtype=np.uint8), "too_small"),
    (Path("/nonexistent/x.png"), "/nonexistent/x.png: unusable image \\(missing_file\\)"),
])
def test_bad_images_are_refused_in_one_line(tokenizer, image, message):
    with pytest.raises(ValueError, match=message):
        build_prompt([image], tokenizer, CONFIG)
