"""GPT-2 (`GPT2LMHeadModel`) split into stages: wte/wpe embedding, `transformer.h` blocks, ln_f + LM head.

The LM head's weight is tied to ``transformer.wte.weight``: when the first and last stage differ, both
hold it and `StageModule.tied_parameters` names it so the pipeline sums its gradient.
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
    causal_lm_loss,
)

_EMBEDDING = "transformer.wte.weight"


class GPT2Stage(StageModule):
    """A contiguous range of a `GPT2LMHeadModel`."""

    blocks_path = "transformer.h"
    causal = True

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        return block(hidden, None, mask)  # positional (hidden, cache, attention_mask), as GPT2Model calls it

    def __init__(self, model: Any, start: int, end: int, *, first: bool, last: bool) -> None:
        tied = model.lm_head.weight is model.transformer.wte.weight
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
            aliases={"lm_head.weight": _EMBEDDING} if tied else {},
            tied=frozenset({_EMBEDDING}) if tied and first != last else frozenset(),
        )
        modules: dict[str, nn.Module] = {}
        if first:
            modules["transformer.wte"] = model.transformer.wte
            modules["transformer.wpe"] = model.transformer.wpe
            modules["transformer.drop"] = model.transformer.drop
        for i in range(start, end):
            modules[f"transformer.h.{i}"] = model.transformer.h[i]
        if last:
            modules["transformer.ln_f"] = model.transformer.ln_f
            modules["lm_head"] = model.lm_head
        self._register_parts(modules)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.part("transformer.wte")(input_ids) + self.part("transformer.wpe")(positions)
        out: torch.Tensor = self.part("transformer.drop")(hidden)
        return out


    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.part("lm_head")(self.part("transformer.ln_f")(hidden))
        return logits

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(logits, batch["labels"])


class GPT2Adapter(ModelAdapter):
    """Adapter for `GPT2LMHeadModel`."""

    task = "causal_lm"
    stage_class = GPT2Stage
    config_names = ('n_embd', 'n_positions', 'n_head')

    def block_shard_plan(self) -> BlockShardPlan:
        return BlockShardPlan(
            attention="attn",
            qkv=("attn.c_attn",),
            out_proj="attn.c_proj",
            mlp_in="mlp.c_fc",
            mlp_out="mlp.c_proj",
            conv1d=True,
            head_attrs=(("num_heads", "heads"), ("split_size", "width"), ("embed_dim", "width")),
        )
