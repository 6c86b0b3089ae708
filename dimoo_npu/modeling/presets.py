"""Built-in model sizes, so a run config can be checked and planned without a checkpoint folder.

A preset is the size part of a public config.json (LLaDA keys), read through `DiMOOConfig.from_dict` like a
real one. Weights still come from ``model.init_from``; the preset only answers "how big" before they exist.
"""

from __future__ import annotations

from typing import Any

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.utils.errors import ConfigError

# Alpha-VLLM/Lumina-DiMOO config.json (LLaDA-8B sizes; 126464 text + 8192 image codes + specials).
PRESETS: dict[str, dict[str, Any]] = {
    "lumina-dimoo-8b": {
        "model_type": "llada",
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "mlp_hidden_size": 12288,
        "embedding_size": 134548,
        "vocab_size": 134548,
        "max_sequence_length": 4096,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
    },
}


def preset_config(name: str) -> DiMOOConfig:
    """The model config of a named preset; `ConfigError` listing the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return DiMOOConfig.from_dict(PRESETS[name])
