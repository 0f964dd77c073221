"""A `PeerChannel` wrapper that records where a process's main thread waits on the transport.

The benchmark hands it to cetd's driver and workers in place of the bare `GrpcPeerChannel`; the
runtime cannot tell the difference. Per kind of tensor (the key's name without its trailing parts:
``act``, ``grad``, ``job/batch``, ``job/control``, ``pipeline/loss``…) it sums the seconds spent
blocked in `recv`, in `send` itself (encoding and queueing on the caller's thread) and in
`SendHandle.wait`, but only from the first timed step on (the step whose control tensor opens the
window), so that setup and warm-up do not count. It also samples the CPU seconds and run-queue waits of every
thread of the process (`bench.pipeline.schedstat`) at the window's ends, to tell the compute thread
from the transport's threads and both from other people's load.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.pipeline.schedstat import ThreadTimes, thread_times
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec

__all__ = ["ChannelTimer", "TimedChannel"]

def _kind(key: TensorKey) -> str:
    """``job/batch/input_ids`` → ``job/batch``; ``pipeline/tied/b0/...`` → ``pipeline/tied``."""
    parts = key.name.split("/")
    return "/".join(parts[:2]) if len(parts) > 1 else re.sub(r"\d+$", "", key.name)


@dataclass(slots=True)
class ChannelTimer:
    """Sums of the main thread's waits on the channel within the timed window."""

    open_step: int
    """The first timed step: its control tensor opens the window."""
    close_step: int
    """The step after the last timed one: its (finish) control tensor closes the window."""
    recv_wait: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    recv_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    send_call: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    send_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    handle_wait: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    opened_at: float | None = None
    cpu_at_open: dict[str, ThreadTimes] = field(default_factory=dict)
    process_cpu_at_open: float = 0.0
    closed: dict[str, Any] | None = None

    def observe_control(self, key: TensorKey) -> None:
        """Open or close the window on the control tensor of the first timed step or the finish."""
        if key.name != "job/control":
            return
        if self.opened_at is None and key.step == self.open_step:
            self.opened_at = time.perf_counter()
            self.cpu_at_open = thread_times()
            self.process_cpu_at_open = time.process_time()
        elif self.opened_at is not None and self.closed is None and key.step == self.close_step:
            self.closed = self._measure()

    @property
    def open(self) -> bool:
        return self.opened_at is not None and self.closed is None

    def report(self) -> dict[str, Any]:
        """The window's sums, its wall seconds and the CPU seconds of each thread within it."""
        if self.closed is not None:
            return self.closed
        if self.opened_at is None:
            return {}
        return self._measure()

    def _measure(self) -> dict[str, Any]:
        assert self.opened_at is not None
        zero = ThreadTimes(0.0, 0.0)
        spent = {name: times - self.cpu_at_open.get(name, zero) for name, times in thread_times().items()}
        return {
            "window_s": time.perf_counter() - self.opened_at,
            "process_cpu_s": time.process_time() - self.process_cpu_at_open,
            "thread_cpu_s": {name: t.cpu for name, t in spent.items() if t.cpu > 0},
            "thread_wait_s": {name: t.wait for name, t in spent.items() if t.wait > 0},
            "main_thread": next((name for name in spent if name.endswith(f"/{os.getpid()}")), ""),
            "recv_wait_s": dict(self.recv_wait),
            "recv_count": dict(self.recv_count),
            "send_call_s": dict(self.send_call),
            "send_count": dict(self.send_count),
            "handle_wait_s": dict(self.handle_wait),
        }


class _TimedHandle:
    def __init__(self, handle: SendHandle, timer: ChannelTimer, kind: str) -> None:
        self._handle = handle
        self._timer = timer
        self._kind = kind

    def wait(self, timeout: float | None = None) -> None:
        started = time.perf_counter()
        self._handle.wait(timeout)
        if self._timer.open:
            self._timer.handle_wait[self._kind] += time.perf_counter() - started


class TimedChannel:
    """``channel`` with every `send`, `recv` and handle wait timed into ``timer``."""

    def __init__(self, channel: PeerChannel, timer: ChannelTimer) -> None:
        self._channel = channel
        self.timer = timer

    @property
    def rank(self) -> int:
        return self._channel.rank

    @property
    def world_size(self) -> int:
        return self._channel.world_size

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> SendHandle:
        self.timer.observe_control(key)
        kind = _kind(key)
        started = time.perf_counter()
        handle = self._channel.send(peer, key, tensor)
        if self.timer.open:
            self.timer.send_call[kind] += time.perf_counter() - started
            self.timer.send_count[kind] += 1
        return _TimedHandle(handle, self.timer, kind)

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        kind = _kind(key)
        started = time.perf_counter()
        tensor = self._channel.recv(peer, key, spec, timeout)
        if self.timer.open:
            self.timer.recv_wait[kind] += time.perf_counter() - started
            self.timer.recv_count[kind] += 1
        self.timer.observe_control(key)
        return tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)  # anything else the runtime may use (close, address…)
