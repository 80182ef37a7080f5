"""Resolve a `--model` argument: a checkpoint folder, a `.ckpt` file, or a preset name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cogvlm2.config import CogVLM2Config
from cogvlm2.errors import CheckpointNotFoundError, ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = PACKAGE_DIR / "demo_model"
PRESET_DIR = PACKAGE_DIR.parent / "configs" / "cogvlm2"
DEFAULT_MODEL = "demo"
RANDOM_WEIGHTS_SEED = 0


@dataclass
class ModelSource:
    """Where a model's config and weights come from. `checkpoint` None means seeded random weights."""
    name: str
    config: CogVLM2Config
    checkpoint: Path | None
    random_seed: int = RANDOM_WEIGHTS_SEED

    @property
    def model_dir(self) -> Path | None:
        """The folder holding the checkpoint (and possibly its tokenizer files), if any."""
        if self.checkpoint is None:
            return None
        return self.checkpoint if self.checkpoint.is_dir() else self.checkpoint.parent


def preset_names() -> list[str]:
    return sorted(["demo"] + [p.stem for p in PRESET_DIR.glob("*.yaml")])


def resolve_model(spec: str | os.PathLike | None, config_yaml: str | os.PathLike | None = None) -> ModelSource:
    """`spec` None or 'demo' is the embedded demo checkpoint; a preset name gives random weights of that size;
    a folder is a Hugging Face checkpoint; a `.ckpt` file is a MindFormers checkpoint (config from `config_yaml`,
    or from a config.json beside it)."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec == "demo":
        return ModelSource("demo", CogVLM2Config.from_json_file(DEMO_MODEL_DIR / "config.json"), DEMO_MODEL_DIR)
    preset = PRESET_DIR / f"{spec}.yaml"
    path = Path(spec)
    if not path.exists() and preset.is_file():
        return ModelSource(spec, CogVLM2Config.from_yaml_file(preset), None)
    if path.is_dir():
        return ModelSource(path.name, CogVLM2Config.from_json_file(path / "config.json"), path)
    if path.is_file() and path.suffix == ".ckpt":
        return ModelSource(path.stem, _ckpt_config(path, config_yaml), path)
    if path.suffix in ("", ".ckpt") and not path.exists() and os.sep not in spec and "/" not in spec:
        raise ConfigError(f"model '{spec}' is neither an existing path nor a preset; presets: {preset_names()}")
    raise CheckpointNotFoundError(f"model path not found: {spec}")


def _ckpt_config(path: Path, config_yaml: str | os.PathLike | None) -> CogVLM2Config:
    if config_yaml is not None:
        return CogVLM2Config.from_yaml_file(config_yaml)
    beside = path.parent / "config.json"
    if beside.is_file():
        return CogVLM2Config.from_json_file(beside)
    raise ConfigError(f"no config for checkpoint {path}: pass --model-config YAML (generate: --config) or put a "
                      "config.json beside it")
