"""Model configuration read from a checkpoint's config.json (LLaDA layout), never hard-coded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dimoo_npu.tokens.special_tokens import build_special_tokens
from dimoo_npu.utils.errors import ConfigError

# The one rope_theta for a config.json that omits it: LLaDA's own code (ModelConfig.rope_theta) defaults to 10000,
# so this is what the public modeling code runs for such a file. The public checkpoints set it (LLaDA-8B and
# Lumina-DiMOO: 500000), so this default never applies to them.
DEFAULT_ROPE_THETA = 10000.0

# Features of the LLaDA config family this model does not implement, with the value it requires.
_REQUIRED_VALUES = {
    "layer_norm_type": ("rms",),
    "alibi": (False, None),
    "rope": (True, None),
    "include_bias": (False, None),
    "include_qkv_bias": (False, None),
    "weight_tying": (False, None),
    "attention_layer_norm": (False, None),
    "input_emb_norm": (False, None),
    "scale_logits": (False, None),
    "block_type": ("llama", "sequential", None),
    "activation_type": ("silu", "swiglu", None),
}


@dataclass
class DiMOOConfig:
    """Sizes and ids of a DiMOO/LLaDA transformer."""

    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    embedding_size: int
    n_kv_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    max_sequence_length: int = 4096
    special_tokens: dict[str, int] = field(default_factory=dict)
    # Sampling defaults the checkpoint asks for (a small model cannot take the public 1024 x 1024); carried
    # through training and export-hf so an exported model keeps them.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # An int8 checkpoint's scheme and kept modules (`dimoo_npu.quantization`); {} for a plain one.
    quantization_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(
                f"n_kv_heads {self.n_kv_heads} != n_heads {self.n_heads}: grouped-query attention "
                "is not part of LLaDA/DiMOO; set n_kv_heads to n_heads or null"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.d_model // self.n_heads} is odd; rotary needs an even head dim")
        if not self.special_tokens:
            self.special_tokens = build_special_tokens({"embedding_size": self.embedding_size})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DiMOOConfig:
        model_type = raw.get("model_type")
        if model_type != "llada":
            raise ConfigError(
                f"config.json has model_type {model_type!r}, not 'llada': this is not a DiMOO/LLaDA checkpoint "
                "(point at the folder of Alpha-VLLM/Lumina-DiMOO or one of ours)"
            )
        for key, allowed in _REQUIRED_VALUES.items():
            if key in raw and raw[key] not in allowed:
                raise ConfigError(f"config.json sets {key}={raw[key]!r}; this model supports {allowed[0]!r} only")
        try:
            d_model = int(raw["d_model"])
            mlp = raw.get("mlp_hidden_size") or int(raw["mlp_ratio"] * d_model)
            return cls(
                d_model=d_model,
                n_layers=int(raw["n_layers"]),
                n_heads=int(raw["n_heads"]),
                n_kv_heads=raw.get("n_kv_heads"),
                mlp_hidden_size=int(mlp),
                embedding_size=int(raw.get("embedding_size") or raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(raw.get("rope_theta", DEFAULT_ROPE_THETA)),
                max_sequence_length=int(raw.get("max_sequence_length", 4096)),
                special_tokens=build_special_tokens(raw),
                generation_defaults=dict(raw.get("generation_defaults") or {}),
                quantization_config=dict(raw.get("quantization_config") or {}),
            )
        except KeyError as err:
            raise ConfigError(f"config.json lacks {err.args[0]!r}, which a LLaDA config must have") from None

    @classmethod
    def from_json(cls, path: str | Path) -> DiMOOConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: point at a checkpoint folder that holds config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); restore it from the checkpoint") from None
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json written next to exported weights (LLaDA keys, plus our special-token table)."""
        return {
            "model_type": "llada",
            "architectures": ["LLaDAForMultiModalGeneration"],
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "mlp_hidden_size": self.mlp_hidden_size,
            "embedding_size": self.embedding_size,
            "vocab_size": self.embedding_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_sequence_length": self.max_sequence_length,
            "mask_token_id": self.special_tokens["mask"],
            "eos_token_id": self.special_tokens["eos"],
            "layer_norm_type": "rms",
            "rope": True,
            "include_bias": False,
            "weight_tying": False,
            "block_type": "llama",
            "activation_type": "silu",
            "special_tokens": dict(self.special_tokens),
            **({"generation_defaults": dict(self.generation_defaults)} if self.generation_defaults else {}),
            **({"quantization_config": dict(self.quantization_config)} if self.quantization_config else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
