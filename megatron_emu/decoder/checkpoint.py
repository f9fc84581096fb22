"""Decoder checkpoints: resume state every --save-interval, a diffusers directory at the end.

Only the UNet trains, and it is replicated (DDP), so rank 0 writes one torch.save file
per iteration: `<save>/iter_0001000/state.pt` with the UNet, optimizer, EMA weights and
the random generators (noise and condition drop: a resumed run draws what the
uninterrupted one would). `<save>/latest` names the newest one and is replaced
atomically, after the file is complete, so a crash mid-save never breaks a resume.
The file's xxh3_64, taken while it is written, goes into `state.json` beside it and is
checked before a resume loads it: torch.load itself reads a flipped byte silently.

The final product is `<save>/decoder/`: unet/ (diffusers UNet2DConditionModel, the
EMA weights when --ema-decay > 0, else the trained ones), unet_trained/ (with EMA, the
non-averaged weights), vae/ and scheduler/ copied from the SD source, so
`tools/generate_image.py --decoder <save>/decoder` runs it directly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

import torch

from megatron_emu.data.checksums import HashingWriter, file_xxh3
from megatron_emu.files import read_json, write_json_atomic, write_text_atomic
from megatron_emu.training.checkpoint_guard import disk_full

log = logging.getLogger("megatron_emu")


def iteration_dir(save: str, step: int) -> str:
    return os.path.join(save, f"iter_{step:07d}")


def save_checkpoint(save: str, step: int, state: dict) -> str:
    path = iteration_dir(save, step)
    sweep_interrupted_saves(save)
    os.makedirs(path, exist_ok=True)
    partial = os.path.join(path, "state.pt.tmp")
    try:
        with open(partial, "wb") as f:
            hashed = HashingWriter(f)
            torch.save(state, hashed)
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(os.path.join(path, DIGEST_NAME), {"xxh3": hashed.hexdigest(), "bytes": os.path.getsize(partial)})
    except BaseException as e:
        for leftover in (partial, os.path.join(path, DIGEST_NAME)):
            if os.path.exists(leftover):
                os.remove(leftover)  # the space it took is the next save's
        with contextlib.suppress(OSError):
            os.rmdir(path)  # if empty: no directory without its state.pt
        if not disk_full(e, save):
            raise
        raise OSError(errno.ENOSPC, f"cannot save decoder step {step}: no space left on the device holding {save}; "
                      f"removed the partial save, latest stays at {read_latest_name(save)}") from None
    os.replace(partial, os.path.join(path, "state.pt"))
    write_text_atomic(os.path.join(save, "latest"), os.path.basename(path))
    return path


DIGEST_NAME = "state.json"


def sweep_interrupted_saves(save: str) -> None:
    """What a killed save left (rank 0 alone saves, so no save is running now): its partial
    state.pt.tmp (the size of a whole state), and an iteration directory left without state.pt."""
    if not os.path.isdir(save):
        return
    for name in os.listdir(save):
        path = os.path.join(save, name)
        if not (name.startswith("iter_") and os.path.isdir(path)):
            continue
        saved = os.path.exists(os.path.join(path, "state.pt"))
        for leftover in ["state.pt.tmp"] + ([] if saved else [DIGEST_NAME]):
            if os.path.exists(os.path.join(path, leftover)):
                os.remove(os.path.join(path, leftover))
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if nothing is left in it


def check_digest(path: str) -> None:
    """state.pt against the xxh3_64 recorded when it was written (a checkpoint of an earlier
    release has none: loaded with a warning)."""
    recorded_at = os.path.join(os.path.dirname(path), DIGEST_NAME)
    if not os.path.exists(recorded_at):
        log.warning("%s: no %s (saved by an earlier release): loaded unverified", path, DIGEST_NAME)
        return
    recorded = read_json(recorded_at, "not a decoder checkpoint digest")
    size = os.path.getsize(path)
    if size != recorded.get("bytes"):
        raise ValueError(f"{path}: {size} bytes, {recorded_at} recorded {recorded.get('bytes')}: the file changed "
                         f"since it was saved (a partial copy?); resume from an earlier iter_* (edit latest)")
    digest = file_xxh3(path)
    if digest != recorded.get("xxh3"):
        raise ValueError(f"{path}: checksum xxh3_64 {digest} differs from {recorded.get('xxh3')} recorded in "
                         f"{recorded_at}: the file changed since it was saved (a flipped byte?); resume from an "
                         f"earlier iter_* (edit latest)")


def read_latest_name(save: str) -> str:
    """What `<save>/latest` names, or that there is none yet."""
    try:
        with open(os.path.join(save, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return "none (no earlier save)"


def load_checkpoint(load: str) -> dict | None:
    """The newest state under `load`; None when the directory holds no checkpoint yet."""
    if not os.path.isdir(load):
        raise ValueError(f"{load}: --load is not a directory")
    latest = os.path.join(load, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        name = f.read().strip()
    path = os.path.join(load, name, "state.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{latest}: names {name}, which has no state.pt")
    check_digest(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: unreadable decoder checkpoint ({e.__class__.__name__})") from None


def save_final(out_dir: str, unet, ema, vae, scheduler_config: dict) -> str:
    """Write the diffusers decoder directory (see the module docstring)."""
    from diffusers import DDPMScheduler

    if ema is not None:
        unet.save_pretrained(os.path.join(out_dir, "unet_trained"))
        with ema.swapped_into(unet):
            unet.save_pretrained(os.path.join(out_dir, "unet"))
    else:
        unet.save_pretrained(os.path.join(out_dir, "unet"))
    vae.save_pretrained(os.path.join(out_dir, "vae"))
    DDPMScheduler.from_config(scheduler_config).save_pretrained(os.path.join(out_dir, "scheduler"))
    return out_dir
