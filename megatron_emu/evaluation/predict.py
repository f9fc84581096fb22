"""What the model answers for a batch of samples, one record each (the cached unit).

- generated answers (caption, vqa, video_qa): batched decoding with the generator; Emu's
  zero-shot QA captions each visual first (chain of thought) and keeps the caption;
- VizWiz: "is the answer known?" decided by the likelihood of " yes" against " no" (the
  paper constrains the generation to these two); "no" -> "unanswerable", else the answer;
- candidates (VisDial, NExT-QA): every option's mean log-probability; the best is the prediction.
Records: {"key", "prediction", "caption"?, "scores"?, "answerable"?}.
"""

from __future__ import annotations

from megatron_emu.evaluation import prompting
from megatron_emu.evaluation.likelihood import continuation_logprobs
from megatron_emu.evaluation.samples import Sample
from megatron_emu.evaluation.tasks import TaskSpec
from megatron_emu.generation.prompts import build_prompt


class Predictor:
    def __init__(self, gen, spec: TaskSpec, setting: str, decoding, rices=None):
        self.gen, self.spec, self.setting, self.decoding, self.rices = gen, spec, setting, decoding, rices
        self.chain_of_thought = prompting.uses_chain_of_thought(spec, gen.model, setting)
        self.k = prompting.num_examples(setting)
        if self.k and rices is None:
            raise ValueError(f"setting {setting} needs in-context examples: give the training files (--train-annotations ...)")
        if self.k and len(rices.pool) < self.k:
            raise ValueError(f"setting {setting} needs {self.k} in-context examples; the training files hold "
                             f"{len(rices.pool)} samples")

    def examples(self, sample: Sample) -> list[Sample]:
        if not self.k:
            return []
        from megatron_emu.evaluation.rices import stage_features

        query = stage_features(self.gen.emu, sample, self.spec, self.gen.forward)
        return self.rices.nearest(query, self.k, exclude=sample.key)

    def __call__(self, batch: list[Sample]) -> list[dict]:
        records = [{"key": s.key} for s in batch]
        captions = [None] * len(batch)
        if self.chain_of_thought:
            captions = self.gen.texts([prompting.caption_prompt(self.spec, s) for s in batch], self.decoding)
            for record, caption in zip(records, captions):
                record["caption"] = caption
        examples = [self.examples(s) for s in batch]
        for record, shown in zip(records, examples):
            if shown:
                record["examples"] = [e.key for e in shown]
        if self.spec.kind in ("dialog", "choice"):
            for record, s, shown, caption in zip(records, batch, examples, captions):
                record["scores"] = self.score_candidates(s, shown, caption, s.candidates)
                record["prediction"] = s.candidates[max(range(len(s.candidates)), key=lambda i: record["scores"][i])]
            return records
        todo = list(range(len(batch)))
        if self.spec.unanswerable:
            todo = self.answerable(batch, examples, captions, records)
        prompts = [prompting.build_prompt(self.spec, self.gen.model, self.setting, batch[i], examples[i], captions[i])
                   for i in todo]
        texts = self.gen.texts(prompts, self.decoding) if prompts else []
        for i, text in zip(todo, texts):
            records[i]["generated"] = text
            records[i]["prediction"] = text.strip() if self.spec.kind == "caption" else prompting.clean_answer(text)
        return records

    def score_candidates(self, sample: Sample, shown: list[Sample], caption, candidates: list[str],
                         extra_question: str = "") -> list[float]:
        items = prompting.build_prompt(self.spec, self.gen.model, self.setting, sample, shown, caption, extra_question)
        prompt = build_prompt(items, self.gen.tokenizer, self.gen.emu.config)
        options = [self.gen.tokenizer.encode(c) for c in candidates]
        return continuation_logprobs(self.gen.forward, prompt, options)

    def answerable(self, batch, examples, captions, records) -> list[int]:
        """VizWiz: the indices whose answer is known; the others are "unanswerable"."""
        known = []
        for i, (s, shown, caption) in enumerate(zip(batch, examples, captions)):
            yes, no = self.score_candidates(s, shown, caption, ["yes", "no"], prompting.UNANSWERABLE_QUESTION)
            records[i]["answerable"] = yes >= no
            if yes >= no:
                known.append(i)
            else:
                records[i]["prediction"] = "unanswerable"
        return known
