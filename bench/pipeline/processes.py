"""The orchestrator's side of the benchmark processes: start them fresh, talk JSON lines, clean up.

Every contender runs in processes started with ``subprocess`` (``python -m bench.pipeline.<module>``),
never forked from this one, as the daemon starts job processes. `Child` reads a process's stdout on a
thread, so that waiting for an event has a deadline; its stderr goes to a log file that is shown when
the process fails. `Children` ends every process it started, by its own handle, whatever happened.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Child", "ChildFailed", "Children"]

_REPOSITORY = Path(__file__).resolve().parents[2]


class ChildFailed(RuntimeError):
    """A benchmark process exited, said something unexpected, or was silent for too long."""


class Child:
    """One benchmark process."""

    def __init__(self, module: str, name: str, log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
        environment.setdefault("OMP_NUM_THREADS", "1")  # torch's pools start with one thread anyway
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=_REPOSITORY,
                env=environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, **message: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event, which must be ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ChildFailed(f"{self.name} sent no {event!r} within {timeout:g} s{self._tail()}") from None
            if line is None:
                self.process.wait(timeout=10)
                raise ChildFailed(
                    f"{self.name} exited with {self.process.returncode} before {event!r}{self._tail()}"
                )
            if not line.startswith("{"):
                continue  # a library printed to stdout
            message: dict[str, Any] = json.loads(line)
            if message.get("event") != event:
                raise ChildFailed(f"{self.name} sent {message.get('event')!r}, expected {event!r}{self._tail()}")
            return message

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            return ""
        return "\n  " + "\n  ".join(lines) if lines else ""

    def end(self) -> None:
        """Wait briefly for a clean exit, then kill this process (only this one)."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Children:
    """The processes of one contender's run; ended together on exit."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def start(self, module: str, name: str) -> Child:
        child = Child(module, name, self._log_dir)
        self._children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is not None:  # a failed run: do not wait for processes that may be blocked on a peer
            for child in self._children:
                if child.process.poll() is None:
                    child.process.kill()
        for child in self._children:
            child.end()
