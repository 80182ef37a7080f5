"""Image loading (path, bytes, PIL image or uint8 array) with size/corruption checks, and CLIP preprocessing.

Decoding is bounded in memory: an image is decoded toward the size it will be resized to (JPEG's DCT scaling via
draft(), then reduce() by whole factors before the colour conversion, keeping at least REDUCING_GAP times the target
so that the bicubic resize that follows sees enough pixels), and concurrent decodes share DECODE_BUDGET, which also hands
the freed memory back to the OS when the last decode of a burst ends."""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image

from cogvlm2.errors import (ImageError, ImageNotFoundError, ImageTooLargeError, UnreadableImageError,
                            UnsupportedImageError)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
DEFAULT_MAX_PIXELS = 40_000_000
REDUCING_GAP = 2  # as PIL resize(reducing_gap=2): reduced images keep >= 2x the target in each dimension
DEFAULT_DECODE_BUDGET_BYTES = 512 * 2 ** 20
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")  # Image.reduce's modes


class DecodeBudget:
    """Memory for concurrent decodes: each reserves its estimate and waits while the others hold the budget (one
    larger than the whole budget runs alone). The allocator keeps large freed blocks resident, so when the last
    decode ends the free heap memory is returned to the OS (malloc_trim)."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._used = 0
        self._condition = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._used == 0 or self._used + nbytes <= self.limit_bytes)
            self._used += nbytes
        try:
            yield
        finally:
            with self._condition:
                self._used -= nbytes
                if self._used == 0:
                    _trim_heap()
                self._condition.notify_all()


def _trim_heap() -> None:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None
DECODE_BUDGET = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, target_size: int | None = None
               ) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an HxWx3 uint8 array; with `target_size` (the
    square it will be resized to), an encoded image may come back reduced by whole factors (module docstring).
    Raises an ImageError subclass naming the problem: ImageNotFoundError, UnreadableImageError (unreadable,
    truncated, corrupt, empty), ImageTooLargeError or UnsupportedImageError."""
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ImageError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image), max_pixels, target_size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise UnreadableImageError("image bytes are empty")
        return _decode(io.BytesIO(data), "image data", max_pixels, target_size)
    if isinstance(image, Image.Image):
        return _from_pil(image, "PIL image", max_pixels, None)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise UnsupportedImageError(f"unsupported image type {type(image).__name__}: expected a path, bytes, a PIL.Image "
                                f"or an HxWx3 uint8 numpy array")


def _load_path(path: Path, max_pixels: int, target_size: int | None) -> Image.Image:
    try:
        if not path.exists():
            raise ImageNotFoundError(f"image file not found: {path}")
        if not path.is_file():
            raise ImageNotFoundError(f"image path is not a file: {path}")
        if path.stat().st_size == 0:
            raise UnreadableImageError(f"image file is empty: {path}")
        with open(path, "rb") as f:
            return _decode(f, f"image file {path}", max_pixels, target_size)
    except OSError as e:  # permission denied, name too long, ...
        raise UnreadableImageError(f"image file cannot be read: {str(path)[:200]}: {e.strerror or e}") from e


def _decode(fp: BinaryIO, source: str, max_pixels: int, target_size: int | None) -> Image.Image:
    try:
        img = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source} has too many pixels (decompression bomb guard): {e}") from e
    except Exception as e:  # format plugins may raise any type; the text is mostly the file object's repr
        raise UnreadableImageError(f"{source} is not a readable image ({type(e).__name__})") from e
    with img:
        return _from_pil(img, source, max_pixels, target_size)


def _from_pil(img: Image.Image, source: str, max_pixels: int, target_size: int | None) -> Image.Image:
    _check_size(img.width, img.height, source, max_pixels)
    try:
        with DECODE_BUDGET.reserve(_decode_bytes(img)):
            if target_size is not None:
                img.draft("RGB", (REDUCING_GAP * target_size, REDUCING_GAP * target_size))  # JPEG only; no-op else
            img.load()  # a full decode, so truncated or corrupt data fails here and not later
            return _reduced(img, target_size).convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source} has too many pixels (decompression bomb guard): {e}") from e
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise UnreadableImageError(f"{source} is truncated or corrupt: {type(e).__name__}: {e}") from e


def _decode_bytes(img: Image.Image) -> int:
    """What decoding and converting `img` may hold at once: its pixels and an RGB copy (PIL keeps 4 bytes per pixel
    for RGB, 1 for one-band modes)."""
    bytes_per_pixel = 1 if len(img.getbands()) == 1 else 4
    return img.width * img.height * (bytes_per_pixel + 4)


def _reduced(img: Image.Image, target_size: int | None) -> Image.Image:
    """img shrunk by the largest whole factor that keeps REDUCING_GAP x target_size in both dimensions."""
    if target_size is None:
        return img
    factor = min(img.width, img.height) // (REDUCING_GAP * target_size)
    if factor < 2:
        return img
    if img.mode not in REDUCIBLE_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    return img.reduce(factor)


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.size == 0:
        raise UnreadableImageError(f"image array is empty (shape {array.shape})")
    if array.ndim != 3 or array.shape[2] != 3:
        raise UnsupportedImageError(f"image array must have shape HxWx3, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise UnsupportedImageError(f"image array must have dtype uint8, got dtype {array.dtype}")
    _check_size(array.shape[1], array.shape[0], "image array", max_pixels)
    return Image.fromarray(np.ascontiguousarray(array))


def _check_size(width: int, height: int, source: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise UnreadableImageError(f"{source} is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{source} is too large: {width}x{height} = {width * height} pixels, more than "
                         f"max_pixels={max_pixels}")


def preprocess_image(img: Image.Image, image_size: int) -> np.ndarray:
    """Squash-resize (bicubic) to image_size x image_size, scale to [0, 1], CLIP-normalise: float32 [3, S, S]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    normalised = (pixels - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def image_content_hash(pixel_values: np.ndarray) -> str:
    """sha256 of the preprocessed float32 pixels: the image's identity for the prefix and encoder caches."""
    return hashlib.sha256(np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes()).hexdigest()
