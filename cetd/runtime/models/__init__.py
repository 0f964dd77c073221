"""Hugging Face models split into pipeline stages, and loading them from a folder or a preset.

`adapter_for(model)` picks the family; `ModelAdapter.make_stage` cuts a contiguous range of blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.models.base import (
    BlockShardPlan,
    ModelAdapter,
    StageModule,
    disable_dropout,
)
from cetd.runtime.models.bert import BertAdapter
from cetd.runtime.models.distilbert import DistilBertAdapter
from cetd.runtime.models.gpt2 import GPT2Adapter
from cetd.runtime.models.opt import OPTAdapter

__all__ = [
    "BlockShardPlan",
    "ModelAdapter",
    "StageModule",
    "adapter_for",
    "disable_dropout",
    "model_dtype",
]

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    "GPT2LMHeadModel": GPT2Adapter,
    "OPTForCausalLM": OPTAdapter,
    "BertForSequenceClassification": BertAdapter,
    "DistilBertForSequenceClassification": DistilBertAdapter,
}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters."""
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class, bound to its config and dtype.

    Raises:
        JobError: the model's class is not one of the supported families.
    """
    adapter_class = _ADAPTERS.get(type(model).__name__)
    if adapter_class is None:
        supported = ", ".join(sorted(_ADAPTERS))
        raise JobError(f"cannot split a {type(model).__name__}; supported models are {supported}")
    return adapter_class(model.config, model_dtype(model))
