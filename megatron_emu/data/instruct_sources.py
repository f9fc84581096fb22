"""Readers for the public instruction datasets the paper used (section 4): one input file ->
RawDocument(kind="conversation") per record, or SkipItem for a bad one (counted, never fatal).

Every document's items are ("system", language | image | video), then its images / video
frames ("image", path or PIL image), then ("user", text), ("assistant", text) per turn;
data/instruct.py renders them with the Emu-I template.

- sharegpt: a JSON list (or JSONL) of {"conversations": [{"from": "human"|"gpt", "value": ...}]};
  a leading "system" turn is dropped (Emu-I uses its own system messages);
- alpaca:   a JSON list (or JSONL) of {"instruction", "input", "output"};
- llava:    LLaVA-Instruct: {"image": path, "conversations": [...]} with the "<image>"
            placeholder in a human turn (the image goes to the system message, Table 6);
- videochat: VideoChat / Video-ChatGPT: {"video": frames folder or file, "fps"?, and
            "QA": [{"q"|"i", "a"}] or "q" + "a" or "conversations"}; 8 frames sampled uniformly.
Relative paths are resolved against the directory of the JSON file.
"""

from __future__ import annotations

import json

from megatron_emu.data.images import SkipItem
from megatron_emu.data.media import resolve, sample_frames
from megatron_emu.data.synthetic import RawDocument

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "bard", "chatgpt")
IMAGE_PLACEHOLDER = "<image>"


def records(path: str):
    """(name, dict) per record of a JSON list or a JSONL file; (name, SkipItem) for a bad one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            yield path, SkipItem("unreadable_shard", f"{path} (invalid JSON: {e})")
            return
        lines = [(n, rec) for n, rec in enumerate(data)]
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((n, json.loads(line)))
                except ValueError:
                    lines.append((n, None))
    for n, rec in lines:
        if not isinstance(rec, dict):
            yield f"{path}:{n}", SkipItem("bad_record", f"{path}:{n}")
        else:
            yield f"{path}:{n}", rec


def turns_of(messages, name: str) -> list[tuple[str, str]]:
    """[{"from", "value"}] -> (instruction, answer) pairs; alternating human / assistant."""
    if not isinstance(messages, list) or not messages:
        raise SkipItem("bad_turns", f"{name} (no conversations)")
    if isinstance(messages[0], dict) and messages[0].get("from") == "system":
        messages = messages[1:]
    roles, texts = [], []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise SkipItem("bad_turns", f"{name} (a turn without from / value)")
        role = str(m.get("from", "")).lower()
        roles.append("user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role)
        texts.append(m["value"].replace(IMAGE_PLACEHOLDER, "").strip())
    if len(roles) % 2 == 1 and roles[-1] == "user":  # an unanswered last question: nothing to train
        roles, texts = roles[:-1], texts[:-1]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected:
        raise SkipItem("bad_turns", f"{name} (turns are not human / assistant alternating)")
    pairs = list(zip(texts[0::2], texts[1::2]))
    if any(not q or not a for q, a in pairs):
        raise SkipItem("empty_text", f"{name} (an empty turn)")
    return pairs


def conversation(system: str, visuals: list, turns: list[tuple[str, str]], name: str) -> RawDocument:
    items = [("system", system)] + [("image", v) for v in visuals]
    for q, a in turns:
        items += [("user", q), ("assistant", a)]
    return RawDocument("conversation", items, name)


def _sharegpt(path: str):
    for name, rec in records(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        try:
            yield conversation("language", [], turns_of(rec.get("conversations"), name), name)
        except SkipItem as s:
            yield s


def _alpaca(path: str):
    for name, rec in records(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        instruction, extra, output = (rec.get(k, "") for k in ("instruction", "input", "output"))
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            yield SkipItem("bad_record", f"{name} (instruction / input / output must be strings)")
            continue
        question = instruction.strip() + ("\n" + extra.strip() if extra.strip() else "")
        if not question or not output.strip():
            yield SkipItem("empty_text", f"{name} (empty instruction or output)")
            continue
        yield conversation("language", [], [(question, output.strip())], name)


def _llava(path: str):
    for name, rec in records(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        image = rec.get("image")
        try:
            turns = turns_of(rec.get("conversations"), name)
        except SkipItem as s:
            yield s
            continue
        if image is None:  # LLaVA's mix also holds text-only conversations
            yield conversation("language", [], turns, name)
        elif isinstance(image, str):
            yield conversation("image", [resolve(path, image)], turns, name)
        else:
            yield SkipItem("bad_record", f"{name} (image is not a path)")


def _video_turns(rec: dict, name: str) -> list[tuple[str, str]]:
    if "conversations" in rec:
        return turns_of(rec["conversations"], name)
    qa = rec.get("QA", [{"q": rec.get("q", rec.get("question")), "a": rec.get("a", rec.get("answer"))}])
    if not isinstance(qa, list):
        raise SkipItem("bad_turns", f"{name} (QA is not a list)")
    pairs = []
    for t in qa:
        q = t.get("q", t.get("i")) if isinstance(t, dict) else None
        a = t.get("a") if isinstance(t, dict) else None
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise SkipItem("bad_turns", f"{name} (a QA pair without q / a text)")
        pairs.append((q.strip(), a.strip()))
    return pairs


def _videochat(path: str):
    for name, rec in records(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        video = rec.get("video", rec.get("video_path"))
        if not isinstance(video, str):
            yield SkipItem("bad_record", f"{name} (no video)")
            continue
        try:
            turns = _video_turns(rec, name)
            frames, _ = sample_frames(resolve(path, video), float(rec.get("fps", 1.0)))
        except SkipItem as s:
            yield SkipItem(s.reason, f"{name}: {s.name}" if not s.name.startswith(name) else s.name)
            continue
        yield conversation("video", frames, turns, name)


READERS = {"sharegpt": _sharegpt, "alpaca": _alpaca, "llava": _llava, "videochat": _videochat}
