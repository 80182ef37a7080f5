"""The server's settings: the `cogvlm2 serve` flags that the HTTP layer (not the engine) reads."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cogvlm2.image import DEFAULT_MAX_PIXELS
from engine.metrics import MetricsSettings

DEFAULT_MAX_BODY_BYTES = 32 * 2 ** 20
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's variable: the key when --api-key is not given


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    image_size: int | None = None  # the model's: images are decoded toward it (cogvlm2.image)
    metrics_require_key: bool = False  # False: /metrics is open (Prometheus scrapes it), as in vLLM
    # CORS, with vLLM's defaults
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def __post_init__(self) -> None:
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).resolve()
            if not folder.is_dir():
                raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a folder")
            self.allowed_local_media_path = folder
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout}")
