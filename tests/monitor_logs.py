"""Test helpers: read back what a run wrote (its log lines, TensorBoard events, an offline
W&B run file) so tests compare the sinks with the printed log line."""

from __future__ import annotations

import glob
import json
import re
import struct

TRAIN_LINE = re.compile(
    r"iteration\s+(?P<iteration>\d+)/\s*\d+ \| consumed samples:\s+(?P<consumed>\d+) \| "
    r"elapsed time per iteration \(ms\): (?P<ms>\S+) \| learning rate: (?P<lr>\S+) \| "
    r"global batch size:\s+(?P<batch>\d+) \| lm loss: (?P<lm>\S+) \| l2 loss: (?P<l2>\S+) \| "
    r"grad norm: (?P<grad>\S+) \| tokens/s: (?P<tokens>\S+) \| TFLOP/s/(?:GPU|device): (?P<tflops>\S+) \|")
VALID_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \| "
                        r"l2 loss value: (\S+) \|")


def log_lines(text: str) -> dict[int, dict[str, float]]:
    """iteration -> the numbers its Megatron log line printed."""
    return {int(m["iteration"]): {k: float(v) for k, v in m.groupdict().items()} for m in TRAIN_LINE.finditer(text)}


def validation_lines(text: str) -> dict[int, tuple[float, float, float]]:
    return {int(m[1]): (float(m[2]), float(m[3]), float(m[4])) for m in VALID_LINE.finditer(text)}


# (TensorBoard tag, log-line field, absolute tolerance of the printed digits or None = relative 2e-6)
PRINTED = (
    ("lm loss", "lm", None), ("l2 loss", "l2", None), ("consumed-samples", "consumed", 0.0),
    ("batch-size", "batch", 0.0), ("learning-rate", "lr", "3E"), ("grad-norm", "grad", 6e-4),
    ("tokens-per-sec", "tokens", 0.06), ("tflops-per-device", "tflops", 6e-4),
)


def close_to_printed(value: float, printed: float, tolerance) -> bool:
    if tolerance is None:  # %.6E: 7 significant digits
        return abs(value - printed) <= 2e-6 * abs(printed)
    if tolerance == "3E":
        return abs(value - printed) <= 6e-4 * abs(printed)
    return abs(value - printed) <= tolerance


def read_events(directory: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars_at(accumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def read_wandb_run(pattern: str) -> tuple[dict, dict[int, dict]]:
    """(config, step -> logged values) of an offline run file (run-*.wandb): W&B's framing is
    LevelDB's log format (32 KiB blocks, 7-byte record headers) after a 7-byte ':W&B' header,
    each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(pattern)
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    block, pos, pending = 32 * 1024, 7, b""
    config, history = {}, {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST completes a record
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        kind_name = record.WhichOneof("record_type")
        items = (record.run.config.update if kind_name == "run" else record.config.update if kind_name == "config"
                 else [])
        config.update({i.key: json.loads(i.value_json) for i in items})
        if kind_name == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    return config, history
