"""--split / --eval-interval / --eval-iters through pretrain(): Megatron's validation
block. (Validation losses equal the single-process loss under PP, TP+SP and FSDP2:
tests/test_parallel_parity.py, check_validation.)"""

import math

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.data.loader import ensure_synthetic_corpus
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from megatron_emu.training.train import pretrain


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("validation-cache"))
    data_path = ensure_synthetic_corpus(cache, EmuTokenizer(build_tiny_tokenizer(cache)), sizes={"pairs": 60})
    return ["--preset", "tiny", "--data-path", *data_path, "--data-cache-dir", cache, "--seq-length", "48",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--num-workers", "0", "--train-iters", "4"]


def test_validation_every_interval_on_the_valid_split(flags, capsys):
    summary = pretrain(parse_args(flags + ["--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "1"]))
    assert [it for it, _, _ in summary.validation] == [2, 4]
    assert all(math.isfinite(lm) and lm > 0 and l2 > 0 for _, lm, l2 in summary.validation)
    assert summary.grounding_data == "validation split"
    out = capsys.readouterr().out
    assert out.count("validation loss at iteration") == 2 and "lm loss PPL" in out


def test_eval_interval_without_validation_samples_is_refused(flags):
    with pytest.raises(ValueError, match="--eval-interval 2 needs validation samples: set --split"):
        pretrain(parse_args(flags + ["--split", "100,0,0", "--eval-interval", "2"]))
