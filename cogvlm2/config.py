"""CogVLM2 configuration: from a checkpoint's config.json or from a yaml preset in configs/cogvlm2/."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cogvlm2.errors import ConfigError

DEFAULT_NUM_KV_HEADS = 8
DEFAULT_ROPE_THETA = 500000.0
EOS_TOKEN_IDS = (128001, 128009)
BOS_TOKEN_ID = 128000
IMAGE_PLACEHOLDER_ID = 128002


@dataclass
class VisionConfig:
    image_size: int = 1344
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    layer_norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2 + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_image(self) -> int:
        """boi + (grid/2)^2 patch tokens after the 2x2 conv + eoi."""
        return (self.grid_size // 2) ** 2 + 2


@dataclass
class CogVLM2Config:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int = DEFAULT_NUM_KV_HEADS
    vocab_size: int = 128256
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    max_position_embeddings: int = 8192
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_ids: tuple[int, ...] = EOS_TOKEN_IDS
    pad_token_id: int = IMAGE_PLACEHOLDER_ID
    template_version: str = "chat"
    torch_dtype: str = "bfloat16"  # the checkpoint's dtype (config.json), or a yaml's param_init_type
    compute_dtype: str | None = None  # a MindFormers yaml's compute_dtype: what dtype="auto" then means
    # a quantized checkpoint's method (config.json's quantization_config, written by `cogvlm2 quantize`)
    quantization: str | None = None
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image

    def validate(self) -> None:
        positive = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_kv_heads",
                    "vocab_size"]
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config field 'hidden_size' ({self.hidden_size}) is not divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(f"config field 'num_attention_heads' ({self.num_attention_heads}) is not divisible "
                              f"by 'num_kv_heads' ({self.num_kv_heads})")
        v = self.vision
        if v.image_size % v.patch_size or (v.image_size // v.patch_size) % 2:
            raise ConfigError(f"vision config: image_size {v.image_size} / patch_size {v.patch_size} must give an "
                              f"even grid")
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"vision config field 'hidden_size' ({v.hidden_size}) is not divisible by 'num_heads' "
                              f"({v.num_heads})")

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "CogVLM2Config":
        """From a Hugging Face CogVLM2 config.json dict (8 KV heads when absent, RoPE base fixed at 500000)."""
        vraw = dict(raw.get("vision_config", {}))
        vision = VisionConfig(**{f.name: vraw[f.name] for f in fields(VisionConfig) if f.name in vraw})
        eos = raw.get("eos_token_id", list(EOS_TOKEN_IDS))
        return cls(
            hidden_size=raw.get("hidden_size", 4096),
            intermediate_size=raw.get("intermediate_size", 14336),
            num_hidden_layers=raw.get("num_hidden_layers", 32),
            num_attention_heads=raw.get("num_attention_heads", 32),
            num_kv_heads=raw.get("num_multi_query_heads", DEFAULT_NUM_KV_HEADS),
            vocab_size=raw.get("vocab_size", 128256),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=raw.get("rope_theta", DEFAULT_ROPE_THETA),
            max_position_embeddings=raw.get("max_position_embeddings", 8192),
            bos_token_id=raw.get("bos_token_id", BOS_TOKEN_ID),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            pad_token_id=raw.get("pad_token_id", IMAGE_PLACEHOLDER_ID),
            template_version=raw.get("template_version", "chat"),
            torch_dtype=raw.get("torch_dtype", "bfloat16"),
            quantization=(raw.get("quantization_config") or {}).get("quant_method"),
            vision=vision,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CogVLM2Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_yaml_file(cls, path: str | os.PathLike) -> "CogVLM2Config":
        """From a yaml preset laid out like MindFormers' predict_cogvlm2_image_llama3_chat_19b.yaml."""
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        model = raw.get("model", {}).get("model_config", {})
        llm = model.get("llm_model", {}).get("model_config", {})
        vis = model.get("vision_model", {}).get("model_config", {})
        eos = llm.get("eos_token_id", list(EOS_TOKEN_IDS))
        vision = VisionConfig(
            image_size=vis.get("image_size", 1344), patch_size=vis.get("patch_size", 14),
            in_channels=vis.get("in_chans", 3), hidden_size=vis.get("hidden_size", 1792),
            num_hidden_layers=vis.get("num_hidden_layers", 63), num_heads=vis.get("num_attention_heads", 16),
            intermediate_size=vis.get("intermediate_size", 15360), layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)))
        return cls(
            hidden_size=llm.get("hidden_size", 4096), intermediate_size=llm.get("intermediate_size", 14336),
            num_hidden_layers=llm.get("num_layers", 32), num_attention_heads=llm.get("num_heads", 32),
            num_kv_heads=llm.get("n_kv_heads", DEFAULT_NUM_KV_HEADS), vocab_size=llm.get("vocab_size", 128256),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-5)), rope_theta=float(llm.get("theta", DEFAULT_ROPE_THETA)),
            max_position_embeddings=llm.get("max_position_embedding", llm.get("seq_length", 8192)),
            bos_token_id=llm.get("bos_token_id", BOS_TOKEN_ID),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            pad_token_id=llm.get("pad_token_id", IMAGE_PLACEHOLDER_ID),
            template_version=model.get("template_version", "chat"),
            torch_dtype=llm.get("param_init_type", "bfloat16"), compute_dtype=llm.get("compute_dtype"),
            vision=vision)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of a Hugging Face CogVLM2 checkpoint with these sizes."""
        v = self.vision
        return {
            "architectures": ["CogVLMForCausalLM"],
            "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": v.in_channels,
                              "num_hidden_layers": v.num_hidden_layers, "hidden_size": v.hidden_size,
                              "patch_size": v.patch_size, "num_heads": v.num_heads,
                              "intermediate_size": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps,
                              "num_positions": v.num_positions, "image_size": v.image_size},
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads, "num_multi_query_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "template_version": self.template_version, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids), "pad_token_id": self.pad_token_id,
            "vocab_size": self.vocab_size, "num_hidden_layers": self.num_hidden_layers, "hidden_act": "silu",
            "use_cache": True, "torch_dtype": self.torch_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
