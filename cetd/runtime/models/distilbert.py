"""DistilBERT (`DistilBertForSequenceClassification`) split into stages.

The head classifies from the first token: ``pre_classifier``, ReLU, dropout, ``classifier``.
DistilBERT has no token types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cetd.runtime.models.base import (
    BlockShardPlan,
    ModelAdapter,
    StageModule,
    classification_loss,
)


class DistilBertStage(StageModule):
    """A contiguous range of a `DistilBertForSequenceClassification`."""

    blocks_path = "distilbert.transformer.layer"

    def __init__(self, model: Any, start: int, end: int, *, first: bool, last: bool) -> None:
        keys = {"input_ids"} if first else set()
        if end > start:
            keys.add("attention_mask")
        if last:
            keys.add("labels")
        super().__init__(
            first=first,
            last=last,
            start_block=start,
            end_block=end,
            batch_keys=frozenset(keys),
            aliases={},
            tied=frozenset(),
        )
        modules: dict[str, nn.Module] = {}
        if first:
            modules["distilbert.embeddings"] = model.distilbert.embeddings
        for i in range(start, end):
            modules[f"distilbert.transformer.layer.{i}"] = model.distilbert.transformer.layer[i]
        if last:
            modules["pre_classifier"] = model.pre_classifier
            modules["dropout"] = model.dropout
            modules["classifier"] = model.classifier
        self._register_parts(modules)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.part("distilbert.embeddings")(batch["input_ids"])
        return out


    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = torch.relu(self.part("pre_classifier")(hidden[:, 0]))
        logits: torch.Tensor = self.part("classifier")(self.part("dropout")(pooled))
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(logits, batch["labels"])


class DistilBertAdapter(ModelAdapter):
    """Adapter for `DistilBertForSequenceClassification`."""

    task = "sequence_classification"
    stage_class = DistilBertStage
    config_names = ('dim', 'max_position_embeddings', 'n_heads')

    def block_shard_plan(self) -> BlockShardPlan:
        return BlockShardPlan(
            attention="attention",
            qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
            out_proj="attention.out_lin",
            mlp_in="ffn.lin1",
            mlp_out="ffn.lin2",
            conv1d=False,
            head_attrs=(("n_heads", "heads"), ("dim", "width")),
        )
