"""The identity layer must import without torch or grpc (DESIGN.md: layers import downward only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cetd.identity

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_identity_imports_neither_torch_nor_grpc() -> None:
    probe = "import json, sys, cetd.identity; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True, timeout=50, check=True
    )
    top_level = set(json.loads(completed.stdout))
    assert "cryptography" in top_level
    assert not top_level & {"torch", "grpc", "transformers", "zeroconf", "numpy"}


@pytest.mark.timeout(10)
def test_public_api_is_exported() -> None:
    exported = set(cetd.identity.__all__)
    assert all(hasattr(cetd.identity, name) for name in exported)
    assert {"init_household", "load_identity", "JoinToken", "TokenStore", "fetch_peer_chain"} <= exported
