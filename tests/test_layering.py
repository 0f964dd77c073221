"""The layering rules of DESIGN.md, checked in fresh interpreters (import order cannot hide a cycle)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import cetd


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.timeout(120)
def test_lower_layers_import_without_torch() -> None:
    out = _fresh(
        "import sys, cetd.identity, cetd.discovery, cetd.cluster; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    assert out == "[]"


@pytest.mark.timeout(120)
def test_daemon_control_plane_imports_without_torch() -> None:
    # The daemon itself never runs torch on its event loop; only job workers import it.
    out = _fresh(
        "import sys, cetd.daemon.daemon, cetd.cli.cetctl; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    assert out == "[]"


@pytest.mark.timeout(120)
def test_a_transport_echo_or_timing_imports_no_model_library() -> None:
    # An echo process, or a transport-only timing, loads what it runs: torch and the tensor transport.
    # transformers alone takes 5 s to import at a whole core of this VM, half a minute on a board at a fifth.
    out = _fresh(
        "import sys, cetd.daemon.worker_main, cetd.runtime.transport_profile, cetd.transport.tensor_channel; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'safetensors', 'datasets'}))"
    )
    assert out == "[]"


@pytest.mark.timeout(120)
def test_runtime_never_imports_grpc_or_zeroconf() -> None:
    runtime = [m.name for m in pkgutil.walk_packages(cetd.__path__, "cetd.") if m.name.startswith("cetd.runtime")]
    out = _fresh(
        f"import sys, importlib; [importlib.import_module(m) for m in {runtime!r}]; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'zeroconf'}))"
    )
    assert out == "[]"


MODULES = sorted(m.name for m in pkgutil.walk_packages(cetd.__path__, "cetd.") if m.name != "cetd.__main__")


@pytest.mark.timeout(300)
def test_every_module_imports_alone() -> None:
    # Each cetd module must import on its own (no hidden import-order dependency, no cycle). A fresh
    # interpreter per module would pay torch's import dozens of times; instead one interpreter imports
    # the third-party dependencies, then forks a child per module, in which no cetd module is loaded yet.
    code = (
        "import importlib, os, sys\n"
        "import grpc, torch, transformers, zeroconf  # third-party only: cetd stays unimported here\n"
        "assert not [m for m in sys.modules if m == 'cetd' or m.startswith('cetd.')]\n"
        f"for m in {MODULES!r}:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(m)\n"
        "        except BaseException as e:\n"
        "            print(m, repr(e), flush=True); os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0: sys.exit(1)\n"
        "print(len(" f"{MODULES!r}" "))\n"
    )
    assert _fresh(code) == str(len(MODULES))
