"""The paper's prompt formats: the visual slot of each system message, and the task prompts' fields."""

import pytest

from megatron_emu.data.prompts import SYSTEM_MESSAGES, TASK_PROMPTS, system_message_parts


def test_system_messages_split_around_the_visual_content():
    assert system_message_parts("language") == ("", "")
    before, after = system_message_parts("image")
    assert before.endswith("presented with an image: ") and after.startswith(". You will be able to see the image")
    before, after = system_message_parts("video")
    assert "multiple chronological images: " in before and after.endswith("based on the given video.")
    with pytest.raises(ValueError, match="choose one of"):
        system_message_parts("audio")


@pytest.mark.parametrize("model", sorted(TASK_PROMPTS))
def test_task_prompts_fill_with_their_fields(model):
    fields = dict(caption="a dog", question="what colour?", answer="red", history="")
    for task, prompt in TASK_PROMPTS[model].items():
        text = prompt.format(**fields)
        assert "{" not in text, (model, task)
        if "qa" in task or task == "vqa":
            assert "what colour?" in text, (model, task)
    assert all("ImageContent" in SYSTEM_MESSAGES[k] for k in ("image", "video"))
