"""Interleaved prompts -> Emu's input: token ids with [IMG] <image>x32 [/IMG] blocks, and the images.

A prompt is a list of items, in the order the model reads them (as in training):
- `str`: text. The markers [USER], [ASSISTANT] (Emu-I's added tokens) and </s> inside it
  become their token ids; everything else goes through sentencepiece;
- an image: a PIL image, a uint8 array (H, W, 3) or (3, H, W), a torch tensor, or a path
  given as `pathlib.Path` (a plain `str` is text);
- a `Video`: its frames (8 by default), each an image block, in order;
- `Tokens`: ids placed as they are (the chat template, tokenized by the training code).
Each image is centre-cropped and resized as in preprocessing and becomes
`[IMG] <image> x 32 [/IMG]`; the model splices its 32 Causal Former embeddings into the
<image> slots (model/emu.py `embed`). Prompts start with <s>.

The paper's task prompts (Appendix C, data/prompts.py) are filled by `task_text`, and
`task_prompt` / `few_shot_prompt` / `chat_prompt` put the image or video before the text
(`chat_prompt` tokenized by the training template, data/instruct.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_emu.data.prompts import ASSISTANT, TASK_PROMPTS, USER

NUM_FRAMES = 8  # frames of a query video (paper: 8, as in pretraining)
SUPPORT_FRAMES = 2  # frames of an in-context example video (Appendix C.3)
EOS_MARK = "</s>"
_MARKERS = re.compile(r"(\[USER\]|\[ASSISTANT\]|</s>)")


@dataclass
class Video:
    """A video as its frames, in time order (images of any accepted kind)."""

    frames: list

    @classmethod
    def from_path(cls, path: str, num_frames: int = NUM_FRAMES) -> "Video":
        """A directory of frame images or a video file (PyAV), `num_frames` spread uniformly."""
        from megatron_emu.data.images import SkipItem
        from megatron_emu.data.media import sample_frames

        try:
            frames, _ = sample_frames(path, fps=1.0)  # the 8 frames preprocessing would keep
        except SkipItem as e:
            raise ValueError(f"{path}: unusable video ({e.reason})") from None
        return cls(frames).subsample(num_frames)

    def subsample(self, num_frames: int) -> "Video":
        """`num_frames` of the frames, spread uniformly (support examples keep 2)."""
        from megatron_emu.data.media import sample_positions

        if num_frames >= len(self.frames):
            return self
        return Video([self.frames[i] for i in sample_positions(len(self.frames), num_frames)])


@dataclass
class Tokens:
    """Token ids placed in the prompt as they are."""

    ids: list[int]


@dataclass
class Prompt:
    tokens: list[int]  # <s> first; image blocks included
    images: torch.Tensor  # uint8 (N, 3, S, S), in order of appearance


def read_image(image, size: int) -> torch.Tensor:
    """Any accepted image -> uint8 (3, size, size), centre square resized as in preprocessing."""
    from PIL import Image

    from megatron_emu.data.images import SkipItem, prepare_image

    name = "" if isinstance(image, (str, os.PathLike)) else type(image).__name__  # a path names itself
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise ValueError(f"image array must be uint8 (H, W, 3) or (3, H, W), got {image.dtype} {image.shape}")
        image = Image.fromarray(image if image.shape[-1] == 3 else image.transpose(1, 2, 0))
    try:
        return torch.from_numpy(prepare_image(image, size, name=name))
    except SkipItem as e:
        raise ValueError(f"{e.name}: unusable image ({e.reason})") from None


def encode_text(text: str, tokenizer) -> list[int]:
    """Text with [USER] / [ASSISTANT] / </s> markers -> ids (markers as their own tokens)."""
    ids = []
    for piece in _MARKERS.split(text):
        if piece == EOS_MARK:
            ids.append(tokenizer.eos_id)
        elif piece in (USER, ASSISTANT):
            if tokenizer.num_special_tokens < 6:
                raise ValueError(f"{piece} needs Emu-I's vocabulary (6 added tokens); this model has "
                                 f"{tokenizer.num_special_tokens}: load an instruction-tuned checkpoint")
            ids.append(tokenizer.special.user if piece == USER else tokenizer.special.assistant)
        elif piece.strip():
            ids.extend(tokenizer.encode(piece))
    return ids


def build_prompt(items: list, tokenizer, config) -> Prompt:
    """Interleaved items -> `<s> ...` ids with one image block per image / video frame."""
    if isinstance(items, (str, Video)) or not isinstance(items, (list, tuple)):
        items = [items]
    special, size = config.special_tokens, config.vision.image_size
    block = [special.img_start] + [special.image] * config.causal_former.num_query_tokens + [special.img_end]
    tokens, images = [tokenizer.bos_id], []
    for item in items:
        if isinstance(item, str):
            tokens += encode_text(item, tokenizer)
            continue
        if isinstance(item, Tokens):
            tokens += item.ids
            continue
        for frame in item.frames if isinstance(item, Video) else [item]:
            tokens += block
            images.append(read_image(frame, size))
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return Prompt(tokens, stacked)


# -- the paper's tasks (Appendix C, Table 8) ----------------------------------------------
def task_text(task: str, model: str = "emu", **fields) -> str:
    """Table 8's template of `task` for `model` ("emu" or "emu-i"), with its fields filled."""
    if model not in TASK_PROMPTS:
        raise ValueError(f"model {model!r}: choose one of {sorted(TASK_PROMPTS)}")
    if task not in TASK_PROMPTS[model]:
        raise ValueError(f"task {task!r}: choose one of {sorted(TASK_PROMPTS[model])}")
    template = TASK_PROMPTS[model][task]
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(f"task {task!r} of {model} needs {{{e.args[0]}}}") from None


def task_prompt(visual, task: str, model: str = "emu", **fields) -> list:
    """The image or video, then the task's text (Appendix C.2: the visual goes first)."""
    return [visual, task_text(task, model, **fields)]


def few_shot_prompt(examples: list[tuple], query: tuple) -> list:
    """k in-context examples before the query (Appendix C.3): (visual, text) pairs, each
    example's text holding its answer, joined with ". "; example videos keep 2 frames."""
    items = []
    for visual, text in examples:
        if isinstance(visual, Video):
            visual = visual.subsample(SUPPORT_FRAMES)
        items += [visual, text.rstrip(". ") + ". "]
    return items + list(query)


def chat_prompt(tokenizer, turns: list[tuple[str, str]], question: str, visual=None) -> list:
    """Emu-I's template (Table 6): <System Message> [USER]: q [ASSISTANT]: a</s> ... [USER]: question [ASSISTANT]:
    tokenized by the code that writes the training conversations (data/instruct.py), so a chat
    prompt is token for token the training sample up to where its answer starts. The system
    message is the image's or the video's, with the visual in its slot; none for text (Appendix B.2)."""
    from megatron_emu.data.indexed import MODE_IMAGE
    from megatron_emu.data.instruct import question_ids, render_conversation

    kind = "language" if visual is None else ("video" if isinstance(visual, Video) else "image")
    frames = [] if visual is None else (visual.frames if isinstance(visual, Video) else [visual])
    frames = [Path(f) if isinstance(f, str) else f for f in frames]  # a frame path is an image, not text
    items = [value if mode == MODE_IMAGE else Tokens(value.tolist())
             for mode, value in render_conversation(tokenizer, kind, frames, list(turns))]
    return items + [Tokens(question_ids(tokenizer, question))]
