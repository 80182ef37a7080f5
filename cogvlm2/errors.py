"""Error types. Every user-facing error is a ValueError subclass (or FileNotFoundError) that names the problem."""
from __future__ import annotations


class CogVLM2Error(Exception):
    """Base class of this package's errors."""


class ConfigError(CogVLM2Error, ValueError):
    """A configuration value is invalid or a preset is unknown."""


class CheckpointError(CogVLM2Error, ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or cannot be read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or folder does not exist."""


class InputError(CogVLM2Error, ValueError):
    """A request's input (prompt, image, history, template) is invalid."""


class ImageError(InputError):
    """An image cannot be read, is empty, too large, or of an unsupported type."""


class ImageNotFoundError(ImageError):
    """An image path names no file (missing, or not a regular file)."""


class UnreadableImageError(ImageError):
    """An image's file or data cannot be read or decoded: empty, not an image, truncated or corrupt."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (max_pixels, or PIL's decompression-bomb guard)."""


class UnsupportedImageError(ImageError):
    """An image was passed as an unsupported Python type, or as an array of the wrong shape or dtype."""


class MessagesError(InputError):
    """Chat messages do not form a conversation CogVLM2 can answer; `param` names the offending field."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


class TooManyImagesError(MessagesError):
    """A conversation carries more than the one image CogVLM2 takes."""


class ImagesDisabledError(ImageError):
    """An image was sent to an engine serving text only (limit_mm_per_prompt image=0: no vision tower loaded)."""


class TemplateError(InputError):
    """Unknown prompt template."""
