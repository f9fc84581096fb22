"""The paper's prompt formats, in one place for training and generation.

- The Emu-I chat template (paper section 4, Appendix B.2, Table 6):
      <System Message> [USER]: <Instruction> [ASSISTANT]: <Answer></s> [USER]: ... [ASSISTANT]: <Answer></s>
  [USER] and [ASSISTANT] are added tokens (ids base + 4, base + 5); </s> is the
  tokenizer's EOS; only the <Answer> tokens (and their </s>) count in the loss.
  The system message of image / video data holds the visual content where Table 6
  writes [IMG]ImageContent[/IMG]: one image, or a video's frames in order.
- The zero-shot task prompts of Appendix C.2 (Table 8) for Emu and Emu-I; the image
  or video goes before the text.
"""

from __future__ import annotations

USER, ASSISTANT = "[USER]", "[ASSISTANT]"
VISUAL_SLOT = "[IMG]ImageContent[/IMG]"  # Table 6's placeholder for the image / the video's frames

SYSTEM_MESSAGES = {
    "language": "",
    "image": ("You are a helpful assistant and you will be presented with an image: [IMG]ImageContent[/IMG]. "
              "You will be able to see the image after I provide it to you. Please answer my questions based "
              "on the given image."),
    "video": ("You are a helpful assistant and you will be presented with a video consisting of multiple "
              "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I provide "
              "it to you. Please answer my questions based on the given video."),
}


def system_message_parts(kind: str) -> tuple[str, str]:
    """(text before, text after) the visual content of a system message; language data has none."""
    if kind not in SYSTEM_MESSAGES:
        raise ValueError(f"system message kind {kind!r}: choose one of {sorted(SYSTEM_MESSAGES)}")
    before, _, after = SYSTEM_MESSAGES[kind].partition(VISUAL_SLOT)
    return before, after


# Appendix C.2, Table 8. {caption} is the model's own caption (multimodal chain of thought).
# Table 8's Emu-I image-QA row prints no {question}; it goes where the video rows put it.
TASK_PROMPTS = {
    "emu": {
        "caption": "describing the image in detail. the image shows",
        "vqa": "a picture of {caption}. based on the picture, {question} short answer:",
        "dialog_turn": "based on the picture, {question} short answer: {answer}",
        "dialog": "a picture of {caption}. {history} based on the picture, {question} short answer:",
        "video_qa": "a video of {caption}. a question about the video: {question} answer:",
        "video_temporal_qa": "a video of {caption}. a question about the video: {question} short answer:",
    },
    "emu-i": {
        "caption": "[USER]: please provide an accurate and concise description of the given image. "
                   "[ASSISTANT]: the image depicts a photo of",
        "vqa": "[USER]: based on the content of the image and common sense, please provide an accurate answer "
               "consisting of only one word or phrase. {question} [ASSISTANT]: the answer is:",
        "dialog_turn": "[USER]: {question} [ASSISTANT]: {answer}.</s>",
        "dialog": "{history} [USER]: {question} [ASSISTANT]:",
        "video_qa": "[USER]: based on the content of the video and common sense, please provide an accurate answer "
                    "consisting of only one word or phrase. {question} [ASSISTANT]: the answer is:",
        "video_temporal_qa": "[USER]: based on the content of the video and common sense, please provide an "
                             "accurate short answer. {question} [ASSISTANT]: the answer is:",
    },
}
