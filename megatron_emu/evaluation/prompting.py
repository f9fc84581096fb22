"""The prompts of each evaluation setting (paper section 5, Appendix C.2-C.3, Table 8).

- zero-shot ("0"): Table 8's template after the image / video. Emu (pretrained) answers
  questions with the multimodal chain of thought: it first captions the visual, and the
  template's {caption} holds that caption;
- two text-only examples ("0*", Table 1's asterisk): two RICES-selected training examples,
  their images removed, each the task's text with its answer, before the zero-shot prompt;
- k shots ("2", "4", "8", Table 3): k RICES-selected (visual, text with answer) examples
  before the query, joined by ". " (Appendix C.3; example videos keep 2 frames). Examples
  carry no caption of their own, so the examples and the query use the template without
  the chain-of-thought sentence ("a picture of {caption}. ").
VisDial's {history} is its earlier rounds, each written as Table 8's dialog turn.
"""

from __future__ import annotations

from pathlib import Path

from megatron_emu.data.prompts import TASK_PROMPTS
from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.tasks import TaskSpec
from megatron_emu.generation.prompts import Video, few_shot_prompt, task_text

CHAIN_OF_THOUGHT = ("a picture of {caption}. ", "a video of {caption}. ")
UNANSWERABLE_QUESTION = " is the answer known?"  # Appendix C.2, VizWiz


def parse_setting(setting: str) -> tuple[int, bool]:
    """"0" / "0*" / "4" -> (shots, text-only examples)."""
    shots, star = (setting[:-1], True) if setting.endswith("*") else (setting, False)
    if not shots.isdigit() or (star and shots != "0"):
        raise ValueError(f"setting {setting!r}: use 0, 0* (two text-only examples) or a number of shots")
    return int(shots), star


def num_examples(setting: str) -> int:
    shots, star = parse_setting(setting)
    return 2 if star else shots


def uses_chain_of_thought(spec: TaskSpec, model: str, setting: str) -> bool:
    """Emu captions the visual first when its zero-shot template has a {caption} field."""
    return model == "emu" and parse_setting(setting)[0] == 0 and "{caption}" in TASK_PROMPTS[model][spec.template]


def load_visual(sample: Sample, spec: TaskSpec):
    return Video.from_path(sample.visual) if spec.video else Path(sample.visual)


def with_question_mark(question: str) -> str:
    question = question.strip()
    return question if question.endswith("?") else question + "?"  # VisDial's questions come without one


def _fields(spec: TaskSpec, model: str, sample: Sample) -> dict:
    if spec.kind == "dialog":
        turns = [task_text("dialog_turn", model, question=with_question_mark(q), answer=a) for q, a in sample.history]
        return {"question": with_question_mark(sample.question), "history": " ".join(turns)}
    return {"question": sample.question} if spec.kind != "caption" else {}


def query_text(spec: TaskSpec, model: str, sample: Sample, caption: str | None = None,
               extra_question: str = "") -> str:
    """The template filled for `sample`: with its caption (chain of thought) or without that sentence."""
    template = TASK_PROMPTS[model][spec.template]
    fields = _fields(spec, model, sample)
    if extra_question:
        fields["question"] = fields["question"] + extra_question
    if caption is None:
        for sentence in CHAIN_OF_THOUGHT:
            template = template.replace(sentence, "")
    else:
        fields["caption"] = caption.rstrip(". ")
    return template.format(**fields)


def example_text(spec: TaskSpec, model: str, example: Sample) -> str:
    """An in-context example: the template without the chain of thought, then its answer."""
    return f"{query_text(spec, model, example)} {example.answer}"


def build_prompt(spec: TaskSpec, model: str, setting: str, sample: Sample, examples: list[Sample],
                 caption: str | None = None, extra_question: str = "") -> list:
    """The interleaved prompt of `sample` in `setting` (examples: RICES's choice, best first)."""
    shots, star = parse_setting(setting)
    visual = load_visual(sample, spec)
    if star:
        texts = [example_text(spec, model, e).rstrip(". ") + ". " for e in examples]
        return texts + [visual, query_text(spec, model, sample, caption, extra_question)]
    if shots == 0:
        return [visual, query_text(spec, model, sample, caption, extra_question)]
    shown = [(load_visual(e, spec), example_text(spec, model, e)) for e in examples]
    return few_shot_prompt(shown, (visual, query_text(spec, model, sample, None, extra_question)))


def caption_prompt(spec: TaskSpec, sample: Sample) -> list:
    """Step one of the chain of thought: Table 8's captioning prompt (Emu's; videos too)."""
    return [load_visual(sample, spec), task_text("caption", "emu")]


def clean_answer(text: str) -> str:
    """A short answer from the generated text: its first sentence, without the filler the paper
    filters ("it is", "it's"; articles go in the VQA normalisation)."""
    answer = text.strip().split("\n")[0]
    for i, c in enumerate(answer):  # a period ends the answer unless a digit follows (2.5)
        if c == "." and not (i + 1 < len(answer) and answer[i + 1].isdigit()):
            answer = answer[:i]
            break
    answer = answer.strip()
    for filler in ("it is ", "it's "):
        if answer.lower().startswith(filler):
            answer = answer[len(filler):]
    return answer.strip()
