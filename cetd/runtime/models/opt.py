"""OPT (`OPTForCausalLM`) split into stages.

The first stage holds the token and learned position embeddings and ``project_in`` (OPT-350m embeds
in 512 and runs blocks in 1024); the last stage holds the final layer norm (absent in OPT-350m, which
normalises after each sub-layer), ``project_out`` and the LM head tied to ``embed_tokens``. Positions
come from the padding mask's cumulative sum, as in transformers.
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
    attention_mask_of,
    causal_lm_loss,
)

_DECODER = "model.decoder"
_EMBEDDING = f"{_DECODER}.embed_tokens.weight"


class OPTStage(StageModule):
    """A contiguous range of an `OPTForCausalLM`."""

    blocks_path = f"{_DECODER}.layers"
    causal = True

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        return block(hidden, attention_mask=mask)

    def __init__(self, model: Any, start: int, end: int, *, first: bool, last: bool) -> None:
        decoder = model.model.decoder
        tied = model.lm_head.weight is decoder.embed_tokens.weight
        keys = {"input_ids", "attention_mask"} if first else set()
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
            aliases={"lm_head.weight": _EMBEDDING} if tied else {},
            tied=frozenset({_EMBEDDING}) if tied and first != last else frozenset(),
        )
        modules: dict[str, nn.Module] = {}
        if first:
            modules[f"{_DECODER}.embed_tokens"] = decoder.embed_tokens
            modules[f"{_DECODER}.embed_positions"] = decoder.embed_positions
            if decoder.project_in is not None:
                modules[f"{_DECODER}.project_in"] = decoder.project_in
        for i in range(start, end):
            modules[f"{_DECODER}.layers.{i}"] = decoder.layers[i]
        if last:
            if decoder.final_layer_norm is not None:
                modules[f"{_DECODER}.final_layer_norm"] = decoder.final_layer_norm
            if decoder.project_out is not None:
                modules[f"{_DECODER}.project_out"] = decoder.project_out
            modules["lm_head"] = model.lm_head
        self._register_parts(modules)

    def _optional(self, name: str) -> nn.Module | None:
        return self._parts.get(f"{_DECODER}.{name}")

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        tokens: torch.Tensor = self.part(f"{_DECODER}.embed_tokens")(input_ids)
        padding = attention_mask_of(batch, tokens)
        positions = (torch.cumsum(padding, dim=1) * padding - 1).long()
        position_embeds: torch.Tensor = self.part(f"{_DECODER}.embed_positions")(padding, 0, position_ids=positions)
        project_in = self._optional("project_in")
        if project_in is not None:
            tokens = project_in(tokens)
        return tokens + position_embeds


    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for name in ("final_layer_norm", "project_out"):
            module = self._optional(name)
            if module is not None:
                hidden = module(hidden)
        logits: torch.Tensor = self.part("lm_head")(hidden)
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(logits, batch["labels"])


class OPTAdapter(ModelAdapter):
    """Adapter for `OPTForCausalLM`."""

    task = "causal_lm"
    stage_class = OPTStage
    config_names = ("hidden_size", "max_position_embeddings", "num_attention_heads")

    def block_shard_plan(self) -> BlockShardPlan:
        return BlockShardPlan(
            attention="self_attn",
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            out_proj="self_attn.out_proj",
            mlp_in="fc1",
            mlp_out="fc2",
            conv1d=False,
            head_attrs=(("num_heads", "heads"), ("embed_dim", "width")),
        )
