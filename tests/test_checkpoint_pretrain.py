"""End to end through pretrain() and the real data loader: 2N steps == N + resume + N."""

from megatron_emu.arguments import parse_args
from megatron_emu.training.checkpoint_files import read_latest
from megatron_emu.training.train import pretrain


def flags(*extra: str) -> list[str]:
    # lr-decay-iters pins the schedule, so the N-step run follows the 2N-step run's LRs.
    return ["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "80",
            "--num-workers", "0", "--lr-decay-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "100",
            "--device", "cpu", *extra]


def test_pretrain_resumes_with_identical_losses(tmp_path):
    reference = pretrain(parse_args(flags("--train-iters", "4"))).history

    save = str(tmp_path / "ckpt")
    first = pretrain(parse_args(flags("--train-iters", "2", "--save", save, "--save-interval", "2"))).history
    assert read_latest(save) == 2
    second = pretrain(parse_args(flags("--train-iters", "4", "--load", save))).history
    assert [row[0] for row in second] == [3, 4]  # resumed at iteration 2
    assert first + second == reference  # (iteration, lm, l2), exact
