"""What every model family provides: a `StageModule` for a contiguous range of blocks and a `ModelAdapter`.

A stage mirrors the Hugging Face module tree: it registers the full model's own sub-modules under their
own paths (``transformer.h.3`` stays ``transformer.h.3``), so ``stage.named_parameters()`` and
``stage.state_dict()`` are keyed by the full model's names and a checkpoint written by any partition
loads into any other. Stages build their attention masks themselves, as additive 4-D float masks in
the activations' dtype (the same mask transformers' eager attention builds), so blocks are causal, or
ignore padding, whatever attention implementation the config names.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cetd.errors import JobError


class StageModule(nn.Module, ABC):
    """Embedding (if first), blocks ``[start_block, end_block)``, and head with loss (if last).

    `forward` returns the hidden state handed to the next stage, or on the last stage the scalar mean
    loss of the micro-batch.
    """

    is_first: bool
    is_last: bool
    start_block: int
    end_block: int
    batch_keys: frozenset[str]
    """The tensors of a micro-batch this stage reads; a pipeline ships only these to it."""

    def __init__(
        self,
        *,
        first: bool,
        last: bool,
        start_block: int,
        end_block: int,
        batch_keys: frozenset[str],
        aliases: Mapping[str, str],
        tied: frozenset[str],
    ) -> None:
        super().__init__()
        self.is_first = first
        self.is_last = last
        self.start_block = start_block
        self.end_block = end_block
        self.batch_keys = batch_keys
        self._aliases = dict(aliases)
        self._tied = tied
        self._parts: dict[str, nn.Module] = {}

    def _register_parts(self, modules: Mapping[str, nn.Module]) -> None:
        """Mirror ``modules`` under their full paths and keep direct (unregistered) references to them."""
        mirror(self, modules)
        self._parts = dict(modules)

    def part(self, path: str) -> nn.Module:
        """The full model's module at ``path`` held by this stage."""
        return self._parts[path]

    def forward(self, hidden: torch.Tensor | None, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run this stage on one micro-batch: hidden state out, or the mean loss on the last stage."""
        out = self._body(hidden, batch)
        if not self.is_last:
            return out
        return self.loss_from_logits(self.head_logits(out, batch), batch)

    def logits(self, hidden: torch.Tensor | None, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's output logits (last stage only), for checking an exported model."""
        if not self.is_last:
            raise ValueError("logits() is only defined on the last stage")
        return self.head_logits(self._body(hidden, batch), batch)

    def _body(self, hidden: torch.Tensor | None, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.is_first:
            hidden = self.embed(batch)
        elif hidden is None:
            raise ValueError("a stage after the first needs the previous stage's hidden state")
        return self.run_blocks(hidden, batch)

    @abstractmethod
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token (and position) embeddings of the micro-batch."""

    blocks_path: ClassVar[str]
    """Module path of the model's block list, e.g. ``transformer.h``."""
    causal: ClassVar[bool] = False
    """Whether blocks attend only to earlier positions (the stage builds the causal mask itself)."""

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        """Run one block the way the family's own model calls it."""
        return block(hidden, mask)

    def run_blocks(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This stage's blocks, with the (causal) additive mask built here, so no stage depends on the
        attention implementation's own masking."""
        if self.end_block == self.start_block:
            return hidden
        mask = additive_mask(attention_mask_of(batch, hidden), causal=self.causal, dtype=hidden.dtype,
                             device=hidden.device)
        for i in range(self.start_block, self.end_block):
            hidden = block_output(self.call_block(self.part(f"{self.blocks_path}.{i}"), hidden, mask))
        return hidden

    @abstractmethod
    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final norm / pooler and output layer."""

    @abstractmethod
    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar mean loss of the micro-batch."""

    def full_name(self, local_name: str) -> str:
        """The full model's canonical name of one of this stage's parameters."""
        return self._aliases.get(local_name, local_name)

    def named_parameters_full(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full model name, parameter) for every parameter held by this stage, each once.

        A tied weight carries its canonical name (``transformer.wte.weight``, not ``lm_head.weight``),
        the one ``save_pretrained`` writes.
        """
        for name, param in self.named_parameters():
            yield self.full_name(name), param

    def full_state_dict_names(self) -> list[str]:
        """Canonical full names of this stage's parameters, in `named_parameters_full` order."""
        return [name for name, _ in self.named_parameters_full()]

    def tied_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that also live on another stage of the same split, by canonical full name.

        Their gradients must be summed across the stages holding them before the optimizer step, or
        the copies drift apart (GPT-2's embedding / LM-head weight on the first and last stage).
        """
        return {name: p for name, p in self.named_parameters_full() if name in self._tied}

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy this stage's parameters from a state dict keyed by canonical full names."""
        with torch.no_grad():
            for name, param in self.named_parameters_full():
                if name not in state:
                    raise JobError(f"the checkpoint has no tensor {name!r}")
                param.copy_(state[name])


@dataclass(frozen=True, slots=True)
class BlockShardPlan:
    """Where the tensor-parallel pieces sit inside one block, as paths relative to the block."""

    attention: str
    """Attention module whose input is copied to every rank (Megatron's f)."""
    qkv: tuple[str, ...]
    """Query/key/value projections: one fused path (GPT-2) or three paths in q, k, v order."""
    out_proj: str
    """Attention output projection (row-parallel)."""
    mlp_in: str
    """First MLP linear (column-parallel)."""
    mlp_out: str
    """Second MLP linear (row-parallel)."""
    conv1d: bool
    """Weights are GPT-2 `Conv1D`, stored ``(in, out)`` instead of ``(out, in)``."""
    head_attrs: tuple[tuple[str, str], ...]
    """(attribute on the attention module, ``"heads"`` or ``"width"``) to set to the local value."""


class ModelAdapter(ABC):
    """One model family: how to split it into stages and how activations between stages look.

    An adapter is bound to one model's config and dtype (see `adapter_for`); `make_stage` may be given
    any model of the same shape (for example, a fresh copy loaded on another device).
    """

    task: str
    """``"causal_lm"`` or ``"sequence_classification"``: what the data loader must produce."""
    stage_class: ClassVar[type[StageModule]]
    """The family's stage, built as ``stage_class(model, start, end, first=, last=)``; its
    ``blocks_path`` locates the blocks."""
    config_names: ClassVar[tuple[str, str, str]]
    """The config's names for hidden size, maximum positions and attention heads."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype

    def num_blocks(self, model: nn.Module) -> int:
        """Number of transformer blocks."""
        return len(list(model.get_submodule(self.stage_class.blocks_path).children()))

    def block_path(self, index: int) -> str:
        """Full module path of block ``index``, e.g. ``transformer.h.3``."""
        return f"{self.stage_class.blocks_path}.{index}"

    def _build_stage(self, model: nn.Module, start: int, end: int, *, first: bool, last: bool) -> StageModule:
        """Build the family's stage, sharing the model's modules."""
        build: Callable[..., StageModule] = self.stage_class  # family stages take (model, start, end, ...)
        return build(model, start, end, first=first, last=last)

    def hidden_size(self) -> int:
        """Width of the activations handed between stages."""
        return int(getattr(self.config, self.config_names[0]))

    def max_seq_len(self) -> int:
        """Longest sequence the position embeddings cover."""
        return int(getattr(self.config, self.config_names[1]))

    @abstractmethod
    def block_shard_plan(self) -> BlockShardPlan:
        """Where tensor parallelism splits a block."""

    def num_heads(self) -> int:
        """Attention heads per block."""
        return int(getattr(self.config, self.config_names[2]))

    def make_stage(
        self,
        model: nn.Module,
        start_block: int,
        end_block: int,
        *,
        first: bool,
        last: bool,
        copy_parameters: bool = False,
    ) -> StageModule:
        """A stage running blocks ``[start_block, end_block)``, plus embedding and head as flagged.

        By default the stage *shares* the model's modules and parameters (no memory cost; stages of
        one model in one process then accumulate into the same tied-weight gradient). With
        ``copy_parameters=True`` the stage owns a deep copy, as it would on a separate device, and a
        tied weight's gradient must be summed across stages explicitly (see `tied_parameters`).
        """
        n = self.num_blocks(model)
        if not 0 <= start_block <= end_block <= n:
            raise ValueError(f"block range [{start_block}, {end_block}) is outside 0..{n}")
        if first and start_block != 0:
            raise ValueError("the first stage must start at block 0")
        if last and end_block != n:
            raise ValueError(f"the last stage must end at block {n}")
        stage = self._build_stage(model, start_block, end_block, first=first, last=last)
        return copy.deepcopy(stage) if copy_parameters else stage

    def hidden_spec(self, micro_batch: int, seq_len: int) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of the activations (and their gradients) between two stages."""
        return self.dtype, (micro_batch, seq_len, self.hidden_size())


def mirror(root: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Register each module under its dotted full path below ``root``, creating plain containers."""
    for path, module in modules.items():
        parent = root
        *heads, leaf = path.split(".")
        for part in heads:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, module)


def submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path below ``root``."""
    return root.get_submodule(path)


def attention_mask_of(batch: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The batch's 2-D padding mask (1 = token), or all ones when the batch carries none."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    return mask


def additive_mask(padding: torch.Tensor, *, causal: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(B, 1, S, S)`` additive mask: 0 where a query may attend to a key, the dtype's minimum elsewhere.

    Equal to what transformers' eager attention path builds, so the composed stages compute the very
    same numbers as the unsplit model.
    """
    batch_size, seq_len = padding.shape
    allowed = padding.to(device=device, dtype=torch.bool)[:, None, None, :].expand(batch_size, 1, seq_len, seq_len)
    if causal:
        tril = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        allowed = allowed & tril
    zero = torch.zeros((), dtype=dtype, device=device)
    minimum = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, minimum)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """Losses are computed in at least float32 (like transformers), but never lower float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are shifted here, -100 is ignored (as transformers does)."""
    shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    flat = logits.to(loss_dtype(logits)).reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(flat, shifted.reshape(-1).to(flat.device), ignore_index=-100)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the micro-batch's sequences."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def block_output(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Blocks return a bare tensor in transformers 5.x and a tuple in 4.x: take the hidden state."""
    return out[0] if isinstance(out, tuple) else out


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to zero.

    Why: dropout draws random numbers whose order depends on how the model is split, so no two
    partitions could compute the same function; training runs without it.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
