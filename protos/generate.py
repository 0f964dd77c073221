"""Generate cetd/wire from protos/ with the pinned grpcio-tools, or check that it is up to date.

    python protos/generate.py          # regenerate cetd/wire/*_pb2*.py(i)
    python protos/generate.py --check  # exit 1 when the committed code differs from a fresh build

Generated code is never edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("cetd") / "wire"
PINNED_GRPCIO_TOOLS = "1.85.1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto under protos/cetd/wire into out_root; return the files written."""
    from importlib.metadata import version

    found = version("grpcio-tools")
    if found != PINNED_GRPCIO_TOOLS:
        sys.exit(f"grpcio-tools {found} installed, {PINNED_GRPCIO_TOOLS} pinned: pip install -e '.[dev]'")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={out_root}", f"--grpc_python_out={out_root}",
            f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}", *protos,
        ],
        check=True,
    )
    init = out_root / PACKAGE / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC code (protos/generate.py). Do not edit."""\n')
    return sorted(p for p in (out_root / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when cetd/wire is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(ROOT):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in (ROOT / PACKAGE).iterdir() if p.is_file()}
        stale = sorted(
            name for name in fresh.keys() | committed.keys()
            if name not in fresh or name not in committed
            or not filecmp.cmp(fresh[name], committed[name], shallow=False)
        )
    if stale:
        print("cetd/wire is stale, run: python protos/generate.py; differs: " + ", ".join(stale))
        return 1
    print("cetd/wire is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
