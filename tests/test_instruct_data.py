"""Instruction data: the Emu-I template, answer-only loss mask through the indexed format,
the four public input formats with bad records skipped and counted."""

import os

import numpy as np
import pytest
import torch

from megatron_emu.config import SpecialTokens
from megatron_emu.data.indexed import MODE_ANSWER, MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.instruct import ConversationView
from megatron_emu.data.packing import collate_packed
from megatron_emu.data.samples import SeqSpec, collate, make_view
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.model.loss import regression_mask, text_labels
from tests.instruct_fixtures import BAD_COUNTS, write_fixtures
from tools.preprocess_data import main as preprocess_main


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")), 6)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("instruct")
    out = {}
    for kind, path in write_fixtures(str(root)).items():
        prefix = str(root / f"out_{kind}")
        report = preprocess_main(["--input-type", kind, "--input", path, "--output-prefix", prefix,
                                  "--tokenizer-model", tok.model_path, "--no-progress"])
        out[kind] = (prefix, report)
    return out


@pytest.mark.parametrize("kind", ["sharegpt", "alpaca", "llava", "videochat"])
def test_formats_keep_good_records_and_count_bad_ones(datasets, kind):
    prefix, report = datasets[kind]
    assert report["documents_out"] == 1
    assert report["skipped"] == BAD_COUNTS[kind]
    assert MultimodalIndexed(prefix).kind == "conversation"


def test_template_and_answer_mask(datasets, tok):
    data = MultimodalIndexed(datasets["sharegpt"][0])
    spec = SeqSpec.from_tokenizer(tok, 160)
    sample = ConversationView(data, spec).build(0, (0,))
    tokens, mask = np.array(sample.tokens), np.array(sample.answer_mask)
    special = tok.special
    # Language data: no system message; [USER]: q [ASSISTANT]: answer</s> per turn.
    assert tokens[0] == tok.bos_id and tokens[1] == special.user
    answers = tok.decode(tokens[mask == 1])
    assert "a lazy dog." in answers and "there are two." in answers
    ends = np.flatnonzero(tokens == tok.eos_id)
    assert len(ends) == 2 and mask[ends].all()  # each answer's </s> is trained
    assert not mask[tokens == special.user].any() and not mask[tokens == special.assistant].any()
    assert tok.decode(tokens[mask == 0]).count("[USER]") == 2
    assert int(mask.sum()) == sum(len(v) for m, v in data.read_document(0) if m == MODE_ANSWER)


def test_image_conversation_system_message_and_no_l2(datasets, tok):
    data = MultimodalIndexed(datasets["llava"][0])
    modes = [m for m, _ in data.read_document(0)]
    assert modes == [MODE_TEXT, MODE_IMAGE, MODE_TEXT, MODE_TEXT, MODE_ANSWER]  # Table 6 order
    spec = SeqSpec.from_tokenizer(tok, 160)
    batch = collate([make_view(data, spec).build(0, (0,))], spec)
    text = tok.decode(batch["tokens"][0][batch["tokens"][0] != spec.pad_id])
    assert "presented with an image:[IMG]" in text and "<image>" not in text.split("[USER]")[1]
    special = SpecialTokens(tok.base_vocab_size)
    labels = text_labels(batch["tokens"], special, answer_mask=batch["answer_mask"])
    trained = batch["tokens"][0, 1:][labels[0] != -100]
    assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == "red."
    assert int((labels != -100).sum()) == int(batch["answer_mask"].sum())
    # The image is an input: without an image in an answer there is no l2 target.
    assert regression_mask(batch["tokens"], special).any()
    assert not regression_mask(batch["tokens"], special, answer_mask=batch["answer_mask"]).any()


def test_video_conversation_has_eight_frames(datasets):
    data = MultimodalIndexed(datasets["videochat"][0])
    assert sum(m == MODE_IMAGE for m, _ in data.read_document(0)) == 8


def test_packed_rows_keep_each_samples_mask(datasets, tok):
    spec = SeqSpec.from_tokenizer(tok, 160)
    samples = [make_view(MultimodalIndexed(datasets[k][0]), spec).build(0, (0,)) for k in ("sharegpt", "alpaca")]
    packed = collate_packed(samples, spec)
    plain = collate(samples, spec)
    assert packed["answer_mask"].shape[0] == 1
    assert torch.equal(packed["answer_mask"].sum(), plain["answer_mask"].sum())
    assert torch.equal(packed["tokens"][0][packed["answer_mask"][0] == 1],
                       torch.cat([plain["tokens"][b][plain["answer_mask"][b] == 1] for b in range(2)]))


def test_truncated_conversation_is_counted(datasets, tok):
    data = MultimodalIndexed(datasets["sharegpt"][0])
    sample = ConversationView(data, SeqSpec.from_tokenizer(tok, 12)).build(0, (0,))
    assert len(sample.tokens) == 12 == len(sample.answer_mask) and sample.truncated_tokens > 0


def test_conversations_need_the_chat_tokens(tmp_path, tok):
    paths = write_fixtures(str(tmp_path))
    with pytest.raises(ValueError, match="--num-special-tokens 6"):
        preprocess_main(["--input-type", "alpaca", "--input", paths["alpaca"], "--output-prefix",
                         str(tmp_path / "x"), "--tokenizer-model", tok.model_path, "--num-special-tokens", "4",
                         "--no-progress"])


def test_an_output_prefix_that_would_overwrite_its_input_is_refused(tmp_path, tok):
    """`--input data/x.json --output-prefix data/x`: the dataset's metadata would replace the
    input file. Refused before anything is written; the input is unchanged."""
    paths = write_fixtures(str(tmp_path))
    before = open(paths["alpaca"], "rb").read()
    prefix = paths["alpaca"].removesuffix(".json")
    with pytest.raises(ValueError, match=f"{paths['alpaca']}: is an input, and --output-prefix {prefix} would "
                                         f"overwrite it with {paths['alpaca']}"):
        preprocess_main(["--input-type", "alpaca", "--input", paths["alpaca"], "--output-prefix", prefix,
                         "--tokenizer-model", tok.model_path, "--no-progress"])
    assert open(paths["alpaca"], "rb").read() == before and not os.path.exists(prefix + ".bin")
