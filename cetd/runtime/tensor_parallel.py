"""Megatron-style tensor parallelism for every supported family, over an injected all-reduce.

Each of ``world`` ranks holds a slice of every block: a contiguous group of attention heads (its
columns of the query/key/value projections, its rows of the output projection) and a contiguous
slice of the MLP's hidden units (columns of the first linear, rows of the second). Embeddings, layer
norms, biases of row-parallel layers and the head are replicated. Two autograd functions carry the
communication (Megatron's f and g): the input of a column-parallel layer is copied forward and its
gradient all-reduced backward; the output of a row-parallel layer is all-reduced forward and its
gradient passed through backward. Replicated parameters therefore get identical gradients on every
rank and need no reduction.

Heads and MLP units are split as evenly as possible (4 heads over 3 ranks: 2, 1, 1), so ``world`` may
be anything up to the number of heads. The all-reduce is a plain callable (sum, same result on every
rank) so the collectives over `PeerChannel` and an in-process test group plug in alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cetd.runtime.models import ModelAdapter, StageModule

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Returns the sum of ``tensor`` over all ranks, identical on every rank; must not modify its input."""


class _CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        ctx.all_reduce = all_reduce
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.all_reduce(grad.contiguous()), None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        return all_reduce(tensor.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_parallel(tensor: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    """Enter a column-parallel region (f)."""
    out: torch.Tensor = _CopyToParallel.apply(tensor, all_reduce)  # type: ignore[no-untyped-call]  # torch leaves Function.apply untyped
    return out


def reduce_from_parallel(tensor: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    """Leave a row-parallel region (g)."""
    out: torch.Tensor = _ReduceFromParallel.apply(tensor, all_reduce)  # type: ignore[no-untyped-call]  # torch leaves Function.apply untyped
    return out


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """``x @ W^T + b`` (``nn.Linear``) or ``x @ W + b`` (GPT-2's ``Conv1D``), as those modules compute it."""
    if not conv1d:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


class ColumnParallelLinear(nn.Module):
    """This rank's output columns of a linear layer; optionally enters the parallel region itself."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, conv1d: bool, all_reduce: AllReduce | None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.conv1d = conv1d
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            x = copy_to_parallel(x, self.all_reduce)
        return _affine(x, self.weight, self.bias, self.conv1d)


class RowParallelLinear(nn.Module):
    """This rank's input rows of a linear layer; sums the partial products, then adds the full bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, conv1d: bool, all_reduce: AllReduce) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.conv1d = conv1d
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_parallel(_affine(x, self.weight, None, self.conv1d), self.all_reduce)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """How one full parameter is cut across ranks."""

    dim: int
    """Dimension along which rank slices are concatenated."""
    parts: int
    """1, or 3 for a fused query/key/value tensor whose q, k and v thirds are each cut."""


def split_sizes(total: int, world: int) -> list[int]:
    """``total`` units over ``world`` ranks, as even as possible, the larger shares first."""
    if not 1 <= world <= total:
        raise ValueError(f"cannot split {total} units over {world} ranks")
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def _range(total: int, world: int, rank: int, unit: int = 1) -> slice:
    sizes = split_sizes(total, world)
    start = sum(sizes[:rank])
    return slice(start * unit, (start + sizes[rank]) * unit)


class TensorParallelModel(nn.Module):
    """One rank of a tensor-parallel model: ``forward(batch)`` returns the micro-batch's mean loss."""

    def __init__(self, stage: StageModule, layout: Mapping[str, ShardSpec], rank: int, world: int) -> None:
        super().__init__()
        self.stage = stage
        self.layout = dict(layout)
        self.rank = rank
        self.world = world

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss: torch.Tensor = self.stage(None, batch)
        return loss

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits (identical on every rank)."""
        return self.stage.logits(None, batch)

    def named_parameters_full(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full model name, this rank's shard or replica) for every parameter."""
        return self.stage.named_parameters_full()

    def shard_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters keyed by full names, for `gather_full_state_dict`."""
        return {name: p.detach().clone() for name, p in self.named_parameters_full()}

    def shard_grads(self) -> dict[str, torch.Tensor]:
        """This rank's gradients keyed by full names (zeros where none was computed)."""
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for name, p in self.named_parameters_full()
        }


def gather_full_state_dict(
    shards: Sequence[Mapping[str, torch.Tensor]], layout: Mapping[str, ShardSpec]
) -> dict[str, torch.Tensor]:
    """Reassemble full parameters (or gradients) from every rank's shard dict, in rank order.

    Replicated tensors are taken from rank 0.
    """
    full: dict[str, torch.Tensor] = {}
    for name, tensor in shards[0].items():
        spec = layout.get(name)
        if spec is None:
            full[name] = tensor.clone()
            continue
        pieces = [shard[name] for shard in shards]
        if spec.parts == 1:
            full[name] = torch.cat(pieces, dim=spec.dim)
        else:
            split = [piece.chunk(spec.parts, dim=spec.dim) for piece in pieces]
            full[name] = torch.cat(
                [torch.cat([s[p] for s in split], dim=spec.dim) for p in range(spec.parts)], dim=spec.dim
            )
    return full


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = module._parameters.get("bias")
    return module.get_parameter("weight").detach(), None if bias is None else bias.detach()


def _column_slice(
    module: nn.Module, cut: slice, *, conv1d: bool, parts: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _weight_and_bias(module)
    if conv1d:  # (in, out): output columns on dim 1
        width = weight.shape[1] // parts
        cols = [weight[:, p * width + cut.start : p * width + cut.stop] for p in range(parts)]
        new_bias = (
            None
            if bias is None
            else torch.cat([bias[p * width + cut.start : p * width + cut.stop] for p in range(parts)])
        )
        return torch.cat(cols, dim=1).clone(), None if new_bias is None else new_bias.clone()
    return weight[cut].clone(), None if bias is None else bias[cut].clone()


def _row_slice(module: nn.Module, cut: slice, *, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _weight_and_bias(module)
    return (weight[cut] if conv1d else weight[:, cut]).clone(), None if bias is None else bias.clone()


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, leaf, module)


def _copy_input_hook(all_reduce: AllReduce) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": copy_to_parallel(kwargs["hidden_states"], all_reduce)}
        else:
            args = (copy_to_parallel(args[0], all_reduce), *args[1:])
        return args, kwargs

    return hook


def make_tensor_parallel_model(
    model: nn.Module, adapter: ModelAdapter, rank: int, world: int, all_reduce: AllReduce
) -> TensorParallelModel:
    """Rank ``rank`` of ``world`` of a tensor-parallel copy of ``model`` (which is left untouched).

    Raises:
        ValueError: ``world`` exceeds the number of attention heads, or ``rank`` is out of range.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    heads = adapter.num_heads()
    head_dim = adapter.hidden_size() // heads
    plan = adapter.block_shard_plan()
    local = copy.deepcopy(model)
    head_cut = _range(heads, world, rank, unit=head_dim)
    local_heads = _range(heads, world, rank).stop - _range(heads, world, rank).start
    layout: dict[str, ShardSpec] = {}
    column_dim, row_dim = (1, 0) if plan.conv1d else (0, 1)
    for index in range(adapter.num_blocks(local)):
        block_path = adapter.block_path(index)
        block = local.get_submodule(block_path)
        attention = block.get_submodule(plan.attention)
        attention.register_forward_pre_hook(_copy_input_hook(all_reduce), with_kwargs=True)
        for attr, kind in plan.head_attrs:
            setattr(attention, attr, local_heads if kind == "heads" else local_heads * head_dim)
        fused = len(plan.qkv) == 1
        for path in plan.qkv:
            weight, bias = _column_slice(
                block.get_submodule(path), head_cut, conv1d=plan.conv1d, parts=3 if fused else 1
            )
            _replace(block, path, ColumnParallelLinear(weight, bias, conv1d=plan.conv1d, all_reduce=None))
            _record(layout, f"{block_path}.{path}", column_dim, parts=3 if fused else 1, has_bias=bias is not None)
        weight, bias = _row_slice(block.get_submodule(plan.out_proj), head_cut, conv1d=plan.conv1d)
        _replace(block, plan.out_proj, RowParallelLinear(weight, bias, conv1d=plan.conv1d, all_reduce=all_reduce))
        layout[f"{block_path}.{plan.out_proj}.weight"] = ShardSpec(row_dim, 1)
        mlp_in = block.get_submodule(plan.mlp_in)
        units = _weight_and_bias(mlp_in)[0].shape[column_dim]
        unit_cut = _range(units, world, rank)
        weight, bias = _column_slice(mlp_in, unit_cut, conv1d=plan.conv1d, parts=1)
        _replace(block, plan.mlp_in, ColumnParallelLinear(weight, bias, conv1d=plan.conv1d, all_reduce=all_reduce))
        _record(layout, f"{block_path}.{plan.mlp_in}", column_dim, parts=1, has_bias=bias is not None)
        weight, bias = _row_slice(block.get_submodule(plan.mlp_out), unit_cut, conv1d=plan.conv1d)
        _replace(block, plan.mlp_out, RowParallelLinear(weight, bias, conv1d=plan.conv1d, all_reduce=all_reduce))
        layout[f"{block_path}.{plan.mlp_out}.weight"] = ShardSpec(row_dim, 1)
    n = adapter.num_blocks(local)
    stage = adapter.make_stage(local, 0, n, first=True, last=True)
    return TensorParallelModel(stage, layout, rank, world)


def _record(layout: dict[str, ShardSpec], path: str, dim: int, *, parts: int, has_bias: bool) -> None:
    layout[f"{path}.weight"] = ShardSpec(dim, parts)
    if has_bias:
        layout[f"{path}.bias"] = ShardSpec(0, parts)
