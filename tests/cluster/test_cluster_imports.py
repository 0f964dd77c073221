"""cetd.cluster imports in a fresh interpreter without torch, grpc or the transport layer.

The planner may use the torch-free job contract (`cetd.runtime.spec`, a layer below) and the pipeline
schedules it replays to cost a plan (`cetd.runtime.schedules`, plain data); nothing else of the runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "grpc", "cetd.transport", "cetd.runtime", "cetd.daemon", "cetd.wire")
ALLOWED = ("cetd.runtime", "cetd.runtime.spec", "cetd.runtime.schedules")


@pytest.mark.timeout(60)
def test_cluster_imports_without_heavy_or_higher_layers() -> None:
    code = (
        "import sys, importlib, pkgutil, cetd.cluster as package\n"
        "for module in pkgutil.iter_modules(package.__path__, 'cetd.cluster.'):\n"
        "    importlib.import_module(module.name)\n"
        f"bad = sorted(m for m in sys.modules if (m.split('.')[0] in {FORBIDDEN!r} or m.startswith({FORBIDDEN!r}))"
        f" and m not in {ALLOWED!r})\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=50, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"cetd.cluster pulled in: {result.stdout.strip()}"
