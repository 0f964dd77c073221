"""BERT (`BertForSequenceClassification`) split into stages: embeddings, encoder layers, pooler + classifier.

Attention is bidirectional; stages after the first still need the padding mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.models.base import (
    BlockShardPlan,
    ModelAdapter,
    StageModule,
    classification_loss,
)


class BertStage(StageModule):
    """A contiguous range of a `BertForSequenceClassification`."""

    blocks_path = "bert.encoder.layer"

    def __init__(self, model: Any, start: int, end: int, *, first: bool, last: bool) -> None:
        if last and model.bert.pooler is None:
            raise JobError("this BERT model has no pooler, so it cannot classify sequences")
        keys = {"input_ids", "token_type_ids"} if first else set()
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
            modules["bert.embeddings"] = model.bert.embeddings
        for i in range(start, end):
            modules[f"bert.encoder.layer.{i}"] = model.bert.encoder.layer[i]
        if last:
            modules["bert.pooler"] = model.bert.pooler
            modules["dropout"] = model.dropout
            modules["classifier"] = model.classifier
        self._register_parts(modules)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.part("bert.embeddings")(
            input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")
        )
        return out


    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.part("dropout")(self.part("bert.pooler")(hidden))
        logits: torch.Tensor = self.part("classifier")(pooled)
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(logits, batch["labels"])


class BertAdapter(ModelAdapter):
    """Adapter for `BertForSequenceClassification`."""

    task = "sequence_classification"
    stage_class = BertStage
    config_names = ('hidden_size', 'max_position_embeddings', 'num_attention_heads')

    def block_shard_plan(self) -> BlockShardPlan:
        return BlockShardPlan(
            attention="attention.self",
            qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
            out_proj="attention.output.dense",
            mlp_in="intermediate.dense",
            mlp_out="output.dense",
            conv1d=False,
            head_attrs=(("num_attention_heads", "heads"), ("all_head_size", "width")),
        )
