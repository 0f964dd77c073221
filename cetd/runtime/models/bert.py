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
    additive_mask,
    attention_mask_of,
    block_output,
    classification_loss,
)


class BertStage(StageModule):
    """A contiguous range of a `BertForSequenceClassification`."""

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

    def run_blocks(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.end_block == self.start_block:
            return hidden
        mask = additive_mask(attention_mask_of(batch, hidden), causal=False, dtype=hidden.dtype, device=hidden.device)
        for i in range(self.start_block, self.end_block):
            hidden = block_output(self.part(f"bert.encoder.layer.{i}")(hidden, mask))
        return hidden

    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.part("dropout")(self.part("bert.pooler")(hidden))
        logits: torch.Tensor = self.part("classifier")(pooled)
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(logits, batch["labels"])


class BertAdapter(ModelAdapter):
    """Adapter for `BertForSequenceClassification`."""

    task = "sequence_classification"

    def num_blocks(self, model: nn.Module) -> int:
        return len(list(model.get_submodule("bert.encoder.layer").children()))

    def block_path(self, index: int) -> str:
        return f"bert.encoder.layer.{index}"

    def _build_stage(self, model: nn.Module, start: int, end: int, *, first: bool, last: bool) -> StageModule:
        return BertStage(model, start, end, first=first, last=last)

    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def max_seq_len(self) -> int:
        return int(self.config.max_position_embeddings)

    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

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
