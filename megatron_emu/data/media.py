"""The media a record points to: paths relative to the file that names them, and the
8 frames sampled uniformly from a video (a folder of frames, or a file decoded with PyAV).
Shared by the pretraining readers (sources.py), the instruction readers
(instruct_sources.py) and generation prompts; failures raise SkipItem(reason, name).
"""

from __future__ import annotations

import os

from megatron_emu.data.images import SkipItem

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NUM_FRAMES = 8


def resolve(base_file: str, p: str) -> str:
    """`p` as named in `base_file`: absolute, or relative to base_file's directory."""
    return p if os.path.isabs(p) else os.path.join(os.path.dirname(os.path.abspath(base_file)), p)


def sample_positions(num_frames: int, k: int = NUM_FRAMES) -> list[int]:
    """k frame indices spread uniformly (centres of k equal segments), increasing."""
    return [int((j + 0.5) * num_frames / k) for j in range(k)]


def sample_frames(video: str, fps: float) -> tuple[list, list[float]]:
    """(NUM_FRAMES frames, their times in seconds) of a frame folder (at `fps`) or a video file."""
    if os.path.isdir(video):
        names = sorted(f for f in os.listdir(video) if f.lower().endswith(IMAGE_EXTS))
        if len(names) < NUM_FRAMES:
            raise SkipItem("too_few_frames", f"{video} ({len(names)} frames)")
        picks = sample_positions(len(names))
        return [os.path.join(video, names[i]) for i in picks], [i / fps for i in picks]
    if not os.path.exists(video):
        raise SkipItem("missing_file", video)
    return _decode_video(video)


def _decode_video(video: str):
    try:
        import av
    except ImportError:
        raise SkipItem("missing_decoder", f"{video} (install PyAV: pip install av)") from None
    try:
        with av.open(video) as container:
            stated = container.streams.video[0].frames  # from the header; 0 when unknown
            picked = _decode_picks(container, stated) if stated >= NUM_FRAMES else None
        if picked is None:  # no (or a wrong) frame count in the header: keep every frame
            with av.open(video) as container:
                decoded = [(float(f.time or 0.0), f.to_image()) for f in container.decode(video=0)]
            if len(decoded) < NUM_FRAMES:
                raise SkipItem("too_few_frames", f"{video} ({len(decoded)} frames)")
            picked = [decoded[i] for i in sample_positions(len(decoded))]
    except SkipItem:
        raise
    except Exception as e:  # PyAV raises its own error family for broken files
        raise SkipItem("corrupt_video", f"{video} ({e.__class__.__name__})") from None
    return [f for _, f in picked], [t for t, _ in picked]


def _decode_picks(container, num_frames: int):
    """Decode up to the last sampled frame, converting only the sampled ones to images
    (a 30 s clip has hundreds of frames); None if the stream ends early."""
    picks = sample_positions(num_frames)
    out = []
    for i, frame in enumerate(container.decode(video=0)):
        if i == picks[len(out)]:
            out.append((float(frame.time or 0.0), frame.to_image()))
            if len(out) == len(picks):
                return out
    return None
