"""The paper's four models, scaled down by one common factor, saved as local ``save_pretrained`` folders.

The paper trains DistilBERT, GPT2-S, OPT-350M and GPT2-L on four Jetson boards. A 2-core machine
cannot train those shapes in minutes, so every one is shrunk by the same rule, which keeps the ratios
between the four (depth to depth, width to width, vocabulary to vocabulary):

- width ÷ `WIDTH_DIVISOR` (8): hidden size, feed-forward size, vocabulary, OPT's embedding projection;
  the number of attention heads is kept (so tensor parallelism still splits 12, 16 or 20 heads and the
  head dimension goes from 64 to 8);
- depth ÷ `DEPTH_DIVISOR` (1.5): 6 → 4, 12 → 8, 24 → 16, 36 → 24 blocks (so DistilBERT still has a
  block per device for a 4-stage pipeline);
- positions cut to `MAX_POSITIONS` (the jobs use short sequences).

Block parameters shrink by ≈ 8² × 1.5 = 96×, embeddings by 8² = 64×. The model presets in
`cetd.runtime.models.presets` are the source of the full shapes; nothing in the runtime is changed:
the product loads the folders through ``--model FOLDER``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAPER_MODELS = ("distilbert", "gpt2-small", "opt-350m", "gpt2-large")
"""The paper's models, smallest first, by their preset names."""

WIDTH_DIVISOR = 8
DEPTH_DIVISOR = 1.5
MAX_POSITIONS = 64

_WIDTH_KEYS = ("n_embd", "hidden_size", "dim", "ffn_dim", "hidden_dim", "word_embed_proj_dim", "vocab_size")
_DEPTH_KEYS = ("n_layer", "num_hidden_layers", "n_layers")
_POSITION_KEYS = ("n_positions", "max_position_embeddings")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaledModel:
    """One of the paper's models at the benchmark's scale."""

    name: str
    """The preset name of the full-size model (``gpt2-large``…)."""
    folder: Path
    """The ``save_pretrained`` folder holding the scaled model."""
    task: str
    """``causal_lm`` or ``sequence_classification`` (decides the data file)."""
    parameters: int
    """Parameters of the scaled model."""
    full_parameters: int
    """Parameters of the paper's model (computed from its config, never downloaded)."""
    blocks: int
    hidden: int
    heads: int


def scaled_config(name: str) -> dict[str, Any]:
    """The preset's config keyword arguments with the common scaling applied."""
    from cetd.runtime.models.presets import PRESETS

    config = dict(PRESETS[name].config)
    for key in _WIDTH_KEYS:
        if key in config:
            config[key] = max(1, round(config[key] / WIDTH_DIVISOR))
    for key in _DEPTH_KEYS:
        if key in config:
            config[key] = max(1, round(config[key] / DEPTH_DIVISOR))
    for key in _POSITION_KEYS:
        if key in config:
            config[key] = min(config[key], MAX_POSITIONS)
    if "intermediate_size" in config:
        config["intermediate_size"] = max(1, round(config["intermediate_size"] / WIDTH_DIVISOR))
    return config


def _parameter_count(name: str, config: dict[str, Any]) -> int:
    """Parameters of a preset's model class at ``config``, built on the meta device (no memory)."""
    import torch

    from cetd.runtime.models.presets import PRESETS

    preset = PRESETS[name]
    with torch.device("meta"):
        model = preset.model_class(preset.config_class(**config))
    return sum(p.numel() for p in model.parameters())


def _shape(config: dict[str, Any]) -> tuple[int, int, int]:
    blocks = next(config[k] for k in _DEPTH_KEYS if k in config)
    hidden = next(config[k] for k in ("n_embd", "hidden_size", "dim") if k in config)
    heads = next(config[k] for k in ("n_head", "num_attention_heads", "n_heads") if k in config)
    return int(blocks), int(hidden), int(heads)


def build_scaled_models(root: Path, *, seed: int = 0, names: tuple[str, ...] = PAPER_MODELS) -> list[ScaledModel]:
    """Write every scaled model under ``root/<name>`` (reused when already there) and describe them."""
    import torch

    from cetd.runtime.models.presets import PRESETS

    models = []
    for name in names:
        preset = PRESETS[name]
        config = scaled_config(name)
        folder = root / name
        marker = folder / "bench-shape.json"
        if not (marker.is_file() and json.loads(marker.read_text()) == config):
            folder.mkdir(parents=True, exist_ok=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = preset.model_class(preset.config_class(**config))
            model.save_pretrained(folder)
            marker.write_text(json.dumps(config, sort_keys=True))
        blocks, hidden, heads = _shape(config)
        models.append(ScaledModel(
            name=name, folder=folder,
            task="causal_lm" if name.startswith(("gpt2", "opt")) else "sequence_classification",
            parameters=_parameter_count(name, config), full_parameters=_parameter_count(name, dict(preset.config)),
            blocks=blocks, hidden=hidden, heads=heads,
        ))
    return models
