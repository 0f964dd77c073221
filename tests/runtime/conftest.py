"""Shared fixtures of the runtime tests: one torch thread, small models, an in-process all-reduce group."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import torch

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ThreadAllReduce:
    """Sum over ``world`` threads, each rank adding the slots in rank order so every rank gets the same bits."""

    def __init__(self, world: int, timeout: float = 60.0) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.calls = 0

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.detach()
            self.barrier.wait()
            total = torch.zeros_like(tensor)
            for slot in self.slots:
                assert slot is not None
                total = total + slot
            if rank == 0:
                self.calls += 1
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return total

        return all_reduce


def run_ranks(world: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(rank)`` on ``world`` threads; re-raise the first failure."""
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "a rank did not finish"
    return results


@pytest.fixture
def thread_group() -> Callable[[int], ThreadAllReduce]:
    """Factory of in-process all-reduce groups for tensor-parallel ranks on threads."""
    return ThreadAllReduce


@pytest.fixture(name="run_ranks")
def run_ranks_fixture() -> Callable[..., list[Any]]:
    """`run_ranks` as a fixture."""
    return run_ranks


def make_batch(
    adapter: Any, vocab: int, *, batch: int = 3, seq_len: int = 12, seed: int = 1
) -> dict[str, torch.Tensor]:
    """A random micro-batch with right padding on the first and last sequence, for ``adapter``'s task."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 250), (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len - 3 :] = 0
    mask[-1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100) if adapter.task == "causal_lm" else torch.arange(batch) % 2
    types = torch.zeros_like(ids)
    types[:, seq_len // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_type_ids": types * mask}


@pytest.fixture(name="make_batch")
def make_batch_fixture() -> Callable[..., dict[str, torch.Tensor]]:
    """`make_batch` as a fixture."""
    return make_batch


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> float:
    """Largest element-wise difference over the named tensors (all of ``a``'s by default)."""
    keys = list(names) if names is not None else list(a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
