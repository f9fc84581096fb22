"""The bundled synthetic corpus: procedurally rendered, learnable multimodal data.

Three document kinds, mirroring the paper's data mixture:
- image-caption pairs (LAION-like): a caption that states colour, shape, count, position;
- interleaved documents (MMC4-like): several images of one theme with related text;
- 8-frame "videos" (WebVid-like): one object moving across the frame, with timed subtitles.

Every caption is a function of the pixels (colour, shape, count, region, direction of
motion), so a model can only lower caption cross-entropy by looking at the image.
Shapes are big, flat and high contrast so that a tiny ViT (patch 28, width 64) learns
them in a few hundred CPU steps. Everything is deterministic in (seed, kind, index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
VIDEO_FRAMES = 8
VIDEO_FPS = 2.0

COLOURS = {
    "red": (230, 30, 30),
    "green": (40, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (245, 225, 20),
    "purple": (160, 50, 210),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
    "cyan": (20, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Region name -> centre of the region, in pixels of the 224x224 canvas.
REGIONS = {"on the left": (60, 112), "on the right": (164, 112), "at the top": (112, 56),
           "at the bottom": (112, 168), "in the middle": (112, 112)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MOTIONS = {  # name -> (start centre, end centre)
    "to the right": ((40, 112), (184, 112)),
    "to the left": ((184, 112), (40, 112)),
    "down": ((112, 40), (112, 184)),
    "up": ((112, 184), (112, 40)),
}


@dataclass
class RawDocument:
    """One preprocessing input: items in reading order.

    Each item is ("text", str) or ("image", PIL.Image). `kind` is pairs | interleaved | video;
    `name` identifies the source in reports. Video documents also carry item timestamps.
    """

    kind: str
    items: list[tuple[str, object]]
    name: str = ""
    timestamps: list[float] = field(default_factory=list)


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    kind_id = {"pairs": 1, "interleaved": 2, "video": 3}[kind]
    return np.random.default_rng([seed, kind_id, index])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, rgb) -> None:
    x, y = centre
    r = radius
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    else:  # cross: two bars, wide enough to survive 28-pixel patches
        w = r * 0.4
        draw.rectangle([x - r, y - w, x + r, y + w], fill=rgb)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=rgb)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(0, 50))  # dark, so every colour stands out
    return (g, g, g)


def render_scene(colour: str, shape: str, count: int, region: str, rng: np.random.Generator) -> Image.Image:
    """`count` equal shapes clustered around a region's centre."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    draw = ImageDraw.Draw(img)
    cx, cy = REGIONS[region]
    radius = {1: 38, 2: 24, 3: 20}[count]
    # Side by side (horizontal regions stack vertically) so shapes never overlap.
    offsets = {1: [0.0], 2: [-1.1, 1.1], 3: [-2.1, 0.0, 2.1]}[count]
    vertical = region in ("on the left", "on the right")
    for k, off in enumerate(offsets):
        jitter = rng.uniform(-4, 4, size=2)
        d = off * radius
        centre = (cx + jitter[0], cy + d + jitter[1]) if vertical else (cx + d + jitter[0], cy + jitter[1])
        _draw_shape(draw, shape, centre, radius, COLOURS[colour])
    return img


def describe(colour: str, shape: str, count: int, region: str) -> str:
    noun = shape if count == 1 else shape + "es" if shape == "cross" else shape + "s"
    article = "a" if count == 1 else COUNT_WORDS[count]
    return f"{article} {colour} {noun} {region}"


def _random_scene(rng: np.random.Generator) -> tuple[str, str, int, str]:
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    count = int(rng.integers(1, 4))
    region = str(rng.choice(list(REGIONS)))
    return colour, shape, count, region


def make_pair(seed: int, index: int) -> RawDocument:
    rng = _rng(seed, "pairs", index)
    scene = _random_scene(rng)
    caption = describe(*scene) + "."
    return RawDocument("pairs", [("text", caption), ("image", render_scene(*scene, rng))], f"synthetic-pair-{index}")


def make_interleaved(seed: int, index: int) -> RawDocument:
    """2-7 images of one shape; the text before each image names the image's content."""
    rng = _rng(seed, "interleaved", index)
    shape = str(rng.choice(SHAPES))
    n = int(rng.integers(2, 8))
    items: list[tuple[str, object]] = [("text", f"a page about {shape}s.")]
    for k in range(n):
        colour, _, count, region = _random_scene(rng)
        items.append(("image", render_scene(colour, shape, count, region, rng)))
        items.append(("text", f"picture {k + 1} shows {describe(colour, shape, count, region)}."))
    return RawDocument("interleaved", items, f"synthetic-doc-{index}")


def render_frame(colour: str, shape: str, centre: tuple[float, float], background) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    _draw_shape(ImageDraw.Draw(img), shape, centre, 32, COLOURS[colour])
    return img


def make_video(seed: int, index: int) -> RawDocument:
    """8 frames (2 fps) of one shape moving in a straight line, with 3 timed subtitles."""
    rng = _rng(seed, "video", index)
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(list(MOTIONS)))
    (x0, y0), (x1, y1) = MOTIONS[motion]
    bg = _background(rng)
    frames, times = [], []
    for k in range(VIDEO_FRAMES):
        a = k / (VIDEO_FRAMES - 1)
        frames.append(render_frame(colour, shape, (x0 + a * (x1 - x0), y0 + a * (y1 - y0)), bg))
        times.append(k / VIDEO_FPS)
    subtitles = [(0.0, f"a {colour} {shape} appears."), (1.2, f"it moves {motion}."), (2.9, f"the {shape} keeps moving {motion}.")]
    return video_document(frames, times, subtitles, f"synthetic-video-{index}")


def video_document(frames: list, frame_times: list[float], subtitles: list[tuple[float, str]], name: str) -> RawDocument:
    """Frames and subtitles interleaved by timestamp (a frame first when times tie)."""
    events = [(t, 0, k, ("image", f)) for k, (t, f) in enumerate(zip(frame_times, frames))]
    events += [(t, 1, k, ("text", s)) for k, (t, s) in enumerate(subtitles)]
    events.sort(key=lambda e: e[:3])
    return RawDocument("video", [e[3] for e in events], name, [e[0] for e in events])


MAKERS = {"pairs": make_pair, "interleaved": make_interleaved, "video": make_video}

# Default corpus size: a few thousand samples, built in well under 30 s on one core.
DEFAULT_SIZES = {"pairs": 2000, "interleaved": 200, "video": 150}


def corpus_text(seed: int = 0, sizes: dict[str, int] | None = None) -> list[str]:
    """All text of the corpus, without rendering images (tokenizer training)."""
    sizes = sizes or DEFAULT_SIZES
    lines = []
    for kind, n in sizes.items():
        for i in range(n):
            doc = _text_only(kind, seed, i)
            lines.extend(doc)
    return lines


def _text_only(kind: str, seed: int, index: int) -> list[str]:
    doc = MAKERS[kind](seed, index)
    return [v for t, v in doc.items if t == "text"]
