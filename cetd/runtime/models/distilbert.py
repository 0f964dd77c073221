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
    additive_mask,
    attention_mask_of,
    block_output,
    classification_loss,
)


class DistilBertStage(StageModule):
    """A contiguous range of a `DistilBertForSequenceClassification`."""

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

    def run_blocks(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.end_block == self.start_block:
            return hidden
        mask = additive_mask(attention_mask_of(batch, hidden), causal=False, dtype=hidden.dtype, device=hidden.device)
        for i in range(self.start_block, self.end_block):
            hidden = block_output(self.part(f"distilbert.transformer.layer.{i}")(hidden, mask))
        return hidden

    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = torch.relu(self.part("pre_classifier")(hidden[:, 0]))
        logits: torch.Tensor = self.part("classifier")(self.part("dropout")(pooled))
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(logits, batch["labels"])


class DistilBertAdapter(ModelAdapter):
    """Adapter for `DistilBertForSequenceClassification`."""

    task = "sequence_classification"

    def num_blocks(self, model: nn.Module) -> int:
        return len(list(model.get_submodule("distilbert.transformer.layer").children()))

    def block_path(self, index: int) -> str:
        return f"distilbert.transformer.layer.{index}"

    def _build_stage(self, model: nn.Module, start: int, end: int, *, first: bool, last: bool) -> StageModule:
        return DistilBertStage(model, start, end, first=first, last=last)

    def hidden_size(self) -> int:
        return int(self.config.dim)

    def max_seq_len(self) -> int:
        return int(self.config.max_position_embeddings)

    def num_heads(self) -> int:
        return int(self.config.n_heads)

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
