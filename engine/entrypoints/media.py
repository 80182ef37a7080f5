"""Image URLs -> PIL images: `data:image/...;base64,` URLs, and `file://` paths only under
--allowed-local-media-path. http(s) URLs are refused: the server never fetches remote URLs. The pixel-count,
decompression-bomb and corruption checks are cogvlm2.image's; its ImageError subclasses become 400s here."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from cogvlm2.errors import ImageError
from cogvlm2.image import load_image
from engine.entrypoints.protocol import ApiError, from_input_error
from engine.entrypoints.settings import ServerSettings

PARAM = "image_url"


def load_image_url(url: str, settings: ServerSettings) -> Image.Image:
    """Blocking (file reads, decoding): run it in a worker thread."""
    data = _image_bytes(url, settings)
    try:
        return load_image(data, settings.max_image_pixels, settings.image_size)
    except ImageError as e:
        raise from_input_error(e, param=PARAM) from e


def _image_bytes(url: str, settings: ServerSettings) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return data_url_bytes(url)
    if scheme == "file":
        return _local_file_bytes(url, settings)
    if scheme in ("http", "https"):
        raise ApiError(400, "remote image URLs are not supported: the server does not fetch URLs; send the image "
                            "inline as a data:image/...;base64, URL", code="remote_url_not_supported", param=PARAM)
    raise ApiError(400, f"unsupported image URL scheme {scheme!r}: use a data:image/...;base64, URL",
                   code="invalid_image_url", param=PARAM)


def data_url_bytes(url: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise ApiError(400, "malformed data URL: no ',' before the data", code="invalid_image_url", param=PARAM)
    media_type, *options = header.split(";")
    if "base64" not in options:
        raise ApiError(400, "image data URLs must be base64-encoded: data:image/png;base64,...",
                       code="invalid_image_url", param=PARAM)
    if media_type and not media_type.lower().startswith("image/"):
        raise ApiError(400, f"the data URL's media type {media_type!r} is not an image type", code="invalid_image",
                       param=PARAM)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image data URL is not valid base64: {e}", code="invalid_base64",
                       param=PARAM) from e


def _local_file_bytes(url: str, settings: ServerSettings) -> bytes:
    allowed = settings.allowed_local_media_path
    if allowed is None:
        raise ApiError(400, "file:// image URLs are disabled; start the server with --allowed-local-media-path",
                       code="local_files_disabled", param=PARAM)
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(400, f"file:// URLs must name a local path, got host {parsed.netloc!r}",
                       code="invalid_image_url", param=PARAM)
    try:
        return _read_allowed_file(Path(unquote(parsed.path)), allowed, settings.max_body_bytes)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a permission, a file gone meanwhile, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a usable path"
        raise ApiError(400, f"the image path cannot be read: {reason}", code="invalid_image_url",
                       param=PARAM) from e


def _read_allowed_file(path: Path, allowed: Path, max_bytes: int) -> bytes:
    path = path.resolve()  # follows symlinks and '..' before the containment check
    if not path.is_relative_to(allowed):
        raise ApiError(400, "the image path is outside the allowed local media folder", code="path_not_allowed",
                       param=PARAM)
    if not path.is_file():
        raise ApiError(400, "image file not found", code="image_not_found", param=PARAM)
    if path.stat().st_size > max_bytes:
        raise ApiError(413, f"image file is larger than {max_bytes} bytes", code="image_too_large", param=PARAM)
    return path.read_bytes()
