"""Text generation from images, videos and text: the Python API.

    from megatron_emu.generation import EmuGenerator, DecodingConfig, Video
    gen = EmuGenerator.load("runs/tiny/ckpt")                      # our checkpoint, any layout
    EmuGenerator.load("ckpt/lora")                                  # adapters, on the base they record
    gen.caption([Path("cat.png")])                                  # ["a cat on a sofa"]
    gen.vqa([Path("cat.png")], ["what colour is the cat?"])         # Emu: caption first (Table 8)
    gen.generate([[Path("a.png"), "a photo of", Path("b.png"), "and"]], DecodingConfig(num_beams=3))

`model` is "emu" (pretrained: Table 8's Emu prompts, with multimodal chain of thought for
QA: the model captions the image, then answers with its caption in the prompt) or "emu-i"
(instruction-tuned, [USER]/[ASSISTANT] template); by default it follows the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_emu.config import NUM_INSTRUCT_SPECIAL_TOKENS
from megatron_emu.generation.decoding import DecodingConfig, generate
from megatron_emu.generation.forward import CachedForward
from megatron_emu.generation.prompts import Video, build_prompt, chat_prompt, few_shot_prompt, task_prompt


@dataclass
class TextResult:
    text: str
    tokens: list[int]
    stop: str  # "eos", "user" or "length"


class EmuGenerator:
    def __init__(self, emu, tokenizer, model: str = "", links=None):
        """links: `emu` is this rank's pipeline stage (generation/stage_links.py)."""
        if tokenizer.vocab_size != emu.config.llm.vocab_size:
            raise ValueError(f"{tokenizer.model_path}: tokenizer vocabulary {tokenizer.vocab_size} but the model's "
                             f"is {emu.config.llm.vocab_size}")
        self.emu, self.tokenizer = emu, tokenizer
        instruct = tokenizer.num_special_tokens == NUM_INSTRUCT_SPECIAL_TOKENS
        self.model = model or ("emu-i" if instruct else "emu")
        self.forward = CachedForward(emu, links)
        self.stop_ids = {tokenizer.eos_id: "eos"}
        if instruct:  # the model opening the next turn has finished its answer
            self.stop_ids[tokenizer.special.user] = "user"

    @classmethod
    def load(cls, path: str, preset: str = "tiny", tokenizer_model: str = "", device="cpu",
             dtype: torch.dtype = torch.float32, model: str = "", base: str = "") -> "EmuGenerator":
        """A checkpoint, adapter checkpoint (on `base`, default the one it records), HF export or
        state file (generation/loading.py); the tiny tokenizer by default. The whole model in
        this process: the Python API's shortcut. Parallel runs (and the tools) build through
        generation/inference.py build_inference, then `from_run`."""
        from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
        from megatron_emu.generation.loading import load_for_inference

        tokenizer_model = tokenizer_model or build_tiny_tokenizer()
        emu = load_for_inference(path, preset, device, dtype, base, tokenizer_model)
        tokenizer = EmuTokenizer(tokenizer_model, emu.config.llm.num_special_tokens)
        return cls(emu, tokenizer, model)

    @classmethod
    def from_run(cls, run, tokenizer_model: str = "", model: str = "") -> "EmuGenerator":
        """The generator of this rank's part of an inference run (generation/inference.py); every
        rank of the run calls it and decodes the same tokens."""
        from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

        tokenizer = EmuTokenizer(tokenizer_model or build_tiny_tokenizer(), run.emu.config.llm.num_special_tokens)
        return cls(run.emu, tokenizer, model, run.links)

    # -- any interleaved prompt ---------------------------------------------------------
    def generate(self, prompts: list[list], config: DecodingConfig | None = None) -> list[TextResult]:
        """Interleaved prompts (generation/prompts.py) -> one continuation each, batched."""
        built = [build_prompt(p, self.tokenizer, self.emu.config) for p in prompts]
        limit = self.emu.config.llm.max_positions
        config = config or DecodingConfig()
        for i, p in enumerate(built):
            if len(p.tokens) + config.max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p.tokens)} tokens + --max-new-tokens {config.max_new_tokens} "
                                 f"exceed the model's {limit} positions")
        results = generate(self.forward, built, config, self.stop_ids)
        return [TextResult(self.tokenizer.decode(r.tokens).strip(), r.tokens, r.stop) for r in results]

    def texts(self, prompts: list[list], config: DecodingConfig | None = None) -> list[str]:
        return [r.text for r in self.generate(prompts, config)]

    # -- the paper's tasks (Appendix C) -------------------------------------------------
    def caption(self, images: list, config: DecodingConfig | None = None) -> list[str]:
        return self.texts([task_prompt(image, "caption", self.model) for image in images], config)

    def vqa(self, images: list, questions: list[str], config: DecodingConfig | None = None) -> list[str]:
        """Short answers. Emu: caption first, then Table 8's QA prompt with that caption."""
        fields = self._chain_of_thought(images, config)
        return self.texts([task_prompt(image, "vqa", self.model, question=q, **f)
                           for image, q, f in zip(images, questions, fields)], config)

    def video_qa(self, videos: list[Video], questions: list[str], temporal: bool = False,
                 config: DecodingConfig | None = None) -> list[str]:
        """Event QA ("answer:") or temporal/causal QA ("short answer:")."""
        task = "video_temporal_qa" if temporal else "video_qa"
        fields = self._chain_of_thought(videos, config)
        return self.texts([task_prompt(video, task, self.model, question=q, **f)
                           for video, q, f in zip(videos, questions, fields)], config)

    def few_shot(self, examples: list[tuple], queries: list[tuple], config: DecodingConfig | None = None) -> list[str]:
        """k (visual, text with answer) examples before each (visual, prompt text) query."""
        return self.texts([few_shot_prompt(examples, q) for q in queries], config)

    def chat(self, question: str, turns: list[tuple[str, str]] = (), visual=None,
             config: DecodingConfig | None = None) -> str:
        """Emu-I: the next answer of a conversation about an image, a video or nothing."""
        if self.model != "emu-i":
            raise ValueError("chat uses Emu-I's [USER]/[ASSISTANT] template: load an instruction-tuned checkpoint")
        return self.texts([chat_prompt(self.tokenizer, list(turns), question, visual)], config)[0]

    def _chain_of_thought(self, visuals: list, config: DecodingConfig | None) -> list[dict]:
        """Emu's QA prompts hold the model's own caption; Emu-I's need none. Table 8 has one
        captioning prompt (images); videos are captioned with it too."""
        if self.model != "emu":
            return [{} for _ in visuals]
        prompts = [task_prompt(v, "caption", "emu") for v in visuals]
        return [{"caption": c.rstrip(". ")} for c in self.texts(prompts, config)]
