"""Images on disk: decoded uint8 pixels ("raw") or JPEG bytes ("jpeg").

A dataset's `.json` says which (`image_format`; datasets written before the field existed
are raw). Raw costs 150,528 bytes per 224 px image and reads as a memcpy; JPEG at
JPEG_QUALITY costs ~10x less and is decoded in the loader's workers with simplejpeg
(libjpeg-turbo, 2.3x faster than Pillow's decoder at 224 px: BENCHMARKS.md).

Encoding and decoding both go through simplejpeg so the writer and the reader use one
codec build. An input that already is a baseline RGB JPEG of the stored size is kept
byte for byte: re-encoding it would only lose quality.
"""

from __future__ import annotations

import io
import os

import numpy as np
import simplejpeg
from PIL import Image

IMAGE_FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 90  # with 4:2:0 chroma (libjpeg's default, what web JPEGs use): PSNR >= 30 dB (BENCHMARKS.md)
JPEG_SUBSAMPLING = "420"


class SkipItem(Exception):
    """One input item that cannot be used; `reason` is a report key."""

    def __init__(self, reason: str, name: str):
        super().__init__(f"{name}: {reason}")
        self.reason, self.name = reason, name


def _describe(image, name: str) -> str:
    """The report's name for an input image: document#item, plus its path when it has one."""
    if isinstance(image, (str, os.PathLike)):
        return f"{name} ({image})" if name else str(image)
    return name or "image"


def open_image(image, name: str = ""):
    """PIL image, path or bytes -> an opened PIL image (not yet decoded)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise SkipItem("missing_file", _describe(image, name))
        return Image.open(image)
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image


def prepare_image(image, image_size: int = 224, min_size: int = 32, name: str = "") -> np.ndarray:
    """PIL image, path or bytes -> uint8 (3, S, S): centre square crop resized to S."""
    return _prepare(image, image_size, min_size, name)[0]


def _prepare(image, image_size: int, min_size: int, name: str) -> tuple[np.ndarray, bool]:
    """(uint8 (3, S, S), whether the input's own bytes may be stored as the JPEG)."""
    source = image
    try:
        image = open_image(image, name)
        keepable = _keepable_jpeg(image, image_size)  # before draft(), which changes size and mode
        if getattr(image, "format", None) == "JPEG":
            # Let libjpeg downscale by 2/4/8 in the DCT while decoding, never below S: a
            # large photo decodes several times faster (no effect at ~500x400).
            image.draft("RGB", (image_size, image_size))
        image.load()
        image = image.convert("RGB")
    except SkipItem:
        raise
    except Exception:  # PIL raises many types for corrupt data; all mean the same here
        raise SkipItem("corrupt_image", _describe(source, name)) from None
    w, h = image.size
    if min(w, h) < min_size:
        raise SkipItem("too_small", f"{_describe(source, name)} ({w}x{h})")
    if (w, h) != (image_size, image_size):
        # Resampling only the centre square (box=) is the same as resize-then-crop, but
        # does not filter the pixels the crop would throw away.
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        image = image.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), keepable  # (3, S, S)


def stored_image(image, image_size: int, image_format: str, name: str = ""):
    """An input image -> what the dataset stores: uint8 (3, S, S) (raw) or JPEG bytes (jpeg)."""
    pixels, keepable = _prepare(image, image_size, 32, name)
    if image_format == "raw":
        return pixels
    if keepable and isinstance(image, (str, os.PathLike, bytes, bytearray)):
        if isinstance(image, (bytes, bytearray)):
            return bytes(image)
        with open(image, "rb") as f:
            return f.read()
    return encode_jpeg(pixels)


def _keepable_jpeg(opened, image_size: int) -> bool:
    """A baseline (not progressive) 3-channel JPEG already at S x S: stored as it came."""
    return (getattr(opened, "format", None) == "JPEG" and opened.size == (image_size, image_size)
            and getattr(opened, "mode", None) == "RGB" and not opened.info.get("progressive")
            and not opened.info.get("progression"))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """uint8 (3, S, S) -> JPEG bytes at JPEG_QUALITY."""
    hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))  # (S, S, 3)
    return simplejpeg.encode_jpeg(hwc, quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling=JPEG_SUBSAMPLING)


def decode_jpeg(data, image_size: int) -> np.ndarray:
    """Stored JPEG bytes -> uint8 (3, S, S); ValueError (reason only) when they are not one."""
    try:
        hwc = simplejpeg.decode_jpeg(data, colorspace="RGB")  # (H, W, 3)
    except Exception as e:  # simplejpeg raises ValueError / RuntimeError for corrupt data
        raise ValueError(f"corrupt JPEG ({e})") from None
    if hwc.shape != (image_size, image_size, 3):
        raise ValueError(f"JPEG is {hwc.shape[1]}x{hwc.shape[0]}x{hwc.shape[2]}, not {image_size}x{image_size}x3")
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (3, S, S)
