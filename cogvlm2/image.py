"""Image loading (path, bytes, PIL image or uint8 array) with size/corruption checks, and CLIP preprocessing."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

from cogvlm2.errors import (ImageError, ImageNotFoundError, ImageTooLargeError, UnreadableImageError,
                            UnsupportedImageError)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
DEFAULT_MAX_PIXELS = 40_000_000

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an HxWx3 uint8 array.
    Raises an ImageError subclass naming the problem: ImageNotFoundError, UnreadableImageError (unreadable,
    truncated, corrupt, empty), ImageTooLargeError or UnsupportedImageError."""
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ImageError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise UnreadableImageError("image bytes are empty")
        return _decode(io.BytesIO(data), "image data", max_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, "PIL image", max_pixels)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise UnsupportedImageError(f"unsupported image type {type(image).__name__}: expected a path, bytes, a PIL.Image "
                                f"or an HxWx3 uint8 numpy array")


def _load_path(path: Path, max_pixels: int) -> Image.Image:
    try:
        if not path.exists():
            raise ImageNotFoundError(f"image file not found: {path}")
        if not path.is_file():
            raise ImageNotFoundError(f"image path is not a file: {path}")
        if path.stat().st_size == 0:
            raise UnreadableImageError(f"image file is empty: {path}")
        with open(path, "rb") as f:
            return _decode(f, f"image file {path}", max_pixels)
    except OSError as e:  # permission denied, name too long, ...
        raise UnreadableImageError(f"image file cannot be read: {str(path)[:200]}: {e.strerror or e}") from e


def _decode(fp: BinaryIO, source: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source} has too many pixels (decompression bomb guard): {e}") from e
    except Exception as e:  # format plugins may raise any type; the text is mostly the file object's repr
        raise UnreadableImageError(f"{source} is not a readable image ({type(e).__name__})") from e
    with img:
        return _from_pil(img, source, max_pixels)


def _from_pil(img: Image.Image, source: str, max_pixels: int) -> Image.Image:
    _check_size(img.width, img.height, source, max_pixels)
    try:
        img.load()  # a full decode, so truncated or corrupt data fails here and not later
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source} has too many pixels (decompression bomb guard): {e}") from e
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise UnreadableImageError(f"{source} is truncated or corrupt: {type(e).__name__}: {e}") from e


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
